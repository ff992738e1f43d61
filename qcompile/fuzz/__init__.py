"""Mutation fuzzer for the native op library (``custom_ops/``), kept in the test suite (issue 22).

Why: the ops read indices, codes and shapes straight out of model files, so a malformed file must come back as
an ONNX Runtime error, never as a crash, an out-of-bounds read or undefined behaviour, and data the contract
accepts (NaN/Inf/denormal scales, empty batches, odd shapes) must still give the reference's answer.

Layout (one module per concern):

* ``case``      -- a fuzz case (one op node with concrete inputs, attributes, CPU-path switches), the ONNX model
  built from it, and the mutations every op shares (special floats, shapes, dtypes, attribute values);
* per op, in its format's package (``qcompile/formats/<name>/fuzz.py``, named by the format's ``OpSpec.fuzz``):
  valid base cases from the numpy references, the op's own mutations, and the computation as a
  real-arithmetic linear map the oracle checks against;
* ``oracle``    -- what a run must give: an error where the reference rejects the inputs, else the
  reference's output within fp32 accumulation error (NaN/Inf propagated, overflow left free);
* ``sanitizer`` -- the AddressSanitizer + UBSan build of the library (built once, cached by source hash) and
  the environment a process needs to load it;
* ``worker``    -- the subprocess that runs cases in ONNX Runtime (a crash kills it, not the fuzzer);
* ``runner``    -- generates cases from seeds, drives the worker, judges, reports; ``tools/fuzz_ops.py`` and
  ``tests/fuzz/test_fuzz_ops.py`` call it.
"""
