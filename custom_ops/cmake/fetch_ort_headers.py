#!/usr/bin/env python3
"""Fetch the ONNX Runtime C/C++ API headers for building qcompile_ops, without touching system state.

The onnxruntime Python wheel ships no headers, so the build takes them from Debian's
``libonnxruntime-dev`` package (API version 21; custom-op libraries built against it load in any
onnxruntime >= 1.21). The package is downloaded with ``apt-get download`` through a *temporary* apt
configuration that reuses the mirror URI of this machine's own Debian sources with suite ``trixie``;
the system's apt lists, cache and sources are never modified and nothing is installed. The .deb is
checked against a pinned SHA-256, unpacked with ``dpkg-deb -x`` and cached, so rebuilds do not refetch.

Prints the include directory (the one holding ``onnxruntime_cxx_api.h``) on stdout; diagnostics go to
stderr. Exit status is non-zero on failure.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by CMake, or loaded by path in tests
import fetch_common  # noqa: E402

PACKAGE = "libonnxruntime-dev"
VERSION = "1.21.0+dfsg-1"
ARCH = "amd64"  # the headers are architecture independent; the pin is for this arch's .deb
SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
SUITE = "trixie"
HEADER = "onnxruntime_cxx_api.h"


def log(msg: str) -> None:
    print(f"[fetch_ort_headers] {msg}", file=sys.stderr)


def default_cache() -> Path:
    return fetch_common.cache_root() / f"ort-headers-{VERSION}"


def find_include(root: Path) -> Path | None:
    for cand in (root / "usr/include/onnxruntime", root / "usr/include/onnxruntime/core/session"):
        if (cand / HEADER).is_file():
            return cand
    return None


def mirror_from_sources(deb822: Path = Path("/etc/apt/sources.list.d/debian.sources"),
                        legacy: Path = Path("/etc/apt/sources.list")) -> tuple[str, str | None]:
    """(URI, Signed-By or None) of the system's main Debian archive, read from its apt sources."""
    if deb822.is_file():
        for stanza in re.split(r"\n\s*\n", deb822.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or line[:1].isspace() or ":" not in line:
                    continue  # comments and continuation lines (e.g. an inline key block)
                key, val = line.split(":", 1)
                fields[key.strip().lower()] = val.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                if uri.rstrip("/").endswith("/debian"):
                    return uri, fields.get("signed-by") or None
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            line = line.split("#", 1)[0]
            opts = re.search(r"\[([^\]]*)\]", line)
            parts = re.sub(r"\[[^\]]*\]", " ", line).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                signed = re.search(r"signed-by=(\S+)", opts.group(1)) if opts else None
                return parts[1], signed.group(1) if signed else None
    raise RuntimeError(f"no Debian archive URI found in {deb822} or {legacy}")


def run(cmd: list[str], cwd: Path) -> None:
    log("$ " + " ".join(cmd))
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}")


def download_deb(work: Path) -> Path:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (this fallback needs a Debian-like system)")
    uri, signed_by = mirror_from_sources()
    log(f"using mirror {uri} suite {SUITE}")
    etc = work / "etc"
    lists = work / "lists"
    cache = work / "cache"
    for d in (etc, lists / "partial", cache / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    src = f"Types: deb\nURIs: {uri}\nSuites: {SUITE}\nComponents: main\n"
    if signed_by:
        src += f"Signed-By: {signed_by}\n"
    (etc / "qcompile-trixie.sources").write_text(src)
    for d in work.rglob("*"):  # apt's download sandbox user must be able to write here
        if d.is_dir():
            d.chmod(0o777)
    work.chmod(0o777)
    opts = [
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={etc}",
        "-o", f"Dir::State::Lists={lists}",
        "-o", f"Dir::Cache={cache}",
        "-o", f"APT::Architecture={ARCH}",
        "-o", f"APT::Architectures={ARCH}",
        "-o", "Debug::NoLocking=1",
        "-q",
    ]
    run(["apt-get", *opts, "update"], work)
    run(["apt-get", *opts, "download", f"{PACKAGE}:{ARCH}={VERSION}"], work)
    debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError("apt-get download produced no .deb")
    return debs[0]


def _unpack(deb: Path, work: Path, partial: Path) -> None:
    staging = work / "x"
    run(["dpkg-deb", "-x", str(deb), str(staging)], work)
    if find_include(staging) is None:
        raise RuntimeError(f"{deb.name} holds no {HEADER}")
    # only the headers (and the licence); the .deb's library symlinks dangle without the runtime package
    shutil.copytree(staging / "usr/include", partial / "usr/include")
    lic = staging / f"usr/share/doc/{PACKAGE}/copyright"
    if lic.is_file():
        shutil.copy2(lic, partial / "copyright")


def fetch(dest: Path, deb: Path | None) -> Path:
    return fetch_common.fetch_pinned(dest, find_include, deb, download_deb, SHA256, _unpack, log, "qcompile-ort-")


if __name__ == "__main__":
    sys.exit(fetch_common.main(__doc__.splitlines()[0], default_cache(), "--deb",
                               "use this already-downloaded .deb (still verified)", fetch, log))
