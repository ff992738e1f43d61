"""Solvers shared by the formats: GPTQ (:mod:`.gptq`), block Hadamard rotations (:mod:`.hadamard`) and
whole-model distillation of a format's float side parameters (:mod:`.distill`). Formats call these; these
never import a format."""
