"""The real SmolLM2 re-quantized by llama.cpp into the file types people download: each loads,
generates, and agrees with llama.cpp on the same file."""

import pytest

import vlm
from vlm.formats.gguf import GGUFFile

pytestmark = pytest.mark.slow

# file type -> the tensor types llama.cpp writes for SmolLM2 (its 576-wide rows are no multiple of 256,
# so K-quants fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 for most matrices)
FILE_TYPES = {
    "Q4_K_M": {"Q4_K", "Q5_0", "Q6_K", "Q8_0"},
    "Q5_K_M": {"Q5_K", "Q5_1", "Q6_K", "Q8_0"},
    "Q6_K": {"Q6_K", "Q8_0"},
    "IQ4_NL": {"IQ4_NL", "Q5_K", "Q8_0"},
    "Q8_0": {"Q8_0"},
}


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_agrees_with_llama_cpp_on_the_same_file(file_type, llama_cpp_quant):
    import agreement

    path = llama_cpp_quant(file_type)
    assert {t.type_name for t in GGUFFile(path).tensors.values()} - {"F32"} == FILE_TYPES[file_type]
    model = vlm.load(path)
    reply = model.generate(model.tokens([{"role": "user", "content": "Name a colour."}])[0].tolist(),
                           max_new_tokens=8)
    assert len(reply.tokens) > 0 and model.tokenizer.decode(reply.tokens).strip()
    llm = agreement.llama_cpp_model(path)
    # Teacher forced on llama.cpp's own greedy continuations, over the positions that predict them.
    assert agreement.continuation_agreement(llm, model, 32, 3) >= 0.97
