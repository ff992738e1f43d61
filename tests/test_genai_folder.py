"""A compiled folder is an onnxruntime-genai model folder: with each of our ops it generates through
onnxruntime-genai (which loads our library from the folder) the same greedy tokens that plain onnxruntime
computes from the same graph; a folder with stock ops only carries no library."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile.api import compile as qcompile_compile
from qcompile.evaluate import forward_logits
from qcompile.runtime import LIBRARY_NAME, make_session
from tiny_model import random_tokens, save_tiny_hf_dir
from genai_helpers import genai_greedy

SMALL = dict(calib_samples=4, seq_len=32, evaluate=False, progress=False)
CASES = {
    "int4-gptq": {"group_size": 32},
    "mxfp4-mr": {},
    "spqr-w3": {"finetune_epochs": 0},
    "aqlm-2x8": {"finetune_epochs": 0, "rounds": 1, "kmeans_iters": 2, "beam_size": 1},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def folder(request, tmp_path_factory, ops_library):
    out = tmp_path_factory.mktemp("genai") / request.param
    qcompile_compile(str(save_tiny_hf_dir()), request.param, out, options=CASES[request.param], **SMALL)
    return request.param, out


def _greedy_onnxruntime(path, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes over the growing sequence (no KV cache)."""
    sess = make_session(str(path / "model.onnx"), ["CPUExecutionProvider"])
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(forward_logits(sess, np.array([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_genai_generates_what_onnxruntime_computes(folder):
    import onnxruntime_genai as og

    name, path = folder
    model = og.Model(str(path))
    for seed in range(2):
        prompt = random_tokens(1, 5, seed=20 + seed)[0].tolist()
        got = genai_greedy(model, prompt, 8)
        assert got == _greedy_onnxruntime(path, prompt, 8), (name, seed)


def test_library_travels_with_the_folder_when_the_graph_needs_it(folder):
    name, path = folder
    options = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    if name == "int4-gptq":  # MatMulNBits is stock onnxruntime
        assert "custom_ops_library" not in options and not (path / LIBRARY_NAME).exists()
    else:
        assert options["custom_ops_library"] == LIBRARY_NAME and (path / LIBRARY_NAME).is_file()
    assert (path / "tokenizer.json").is_file() and (path / "report.json").is_file()
