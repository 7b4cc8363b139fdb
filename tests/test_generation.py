"""Generation: KV cache vs recomputation, HF parity, batching, chunked prefill, exact text, streaming,
stop strings, infilling and chat prompts, context and memory errors."""

from __future__ import annotations

import copy

import pytest
import torch

from codellama import generation, generation_admission, generation_forward
from codellama.api import CodeLlama
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.formats import chat_tokens
from codellama.generation import Completion, TextStream, generate
from codellama.model import Transformer
from codellama.tokenizer import Tokenizer




def _greedy_by_recompute(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: the full sequence through the model at every step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture
def sharp_model(tiny_config) -> Transformer:
    # Larger weights than init_weights' give peaked, varied next-token distributions (no near-ties, no loops).
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    model.init_weights(std=0.3)
    return model.eval()


def test_kv_cache_greedy_equals_full_recompute(sharp_model):
    prompt = [1, 17, 300, 42, 9, 250]
    [res] = generate(sharp_model, [prompt], max_new_tokens=24)
    assert res.tokens == _greedy_by_recompute(sharp_model, prompt, 24)
    assert res.finish_reason == "length" and len(set(res.tokens)) > 5


def test_greedy_equals_hf_transformers_generate(sharp_model, tiny_config):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(**tiny_config.to_hf())
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    c = tiny_config
    state = {}
    for name, w in sharp_model.state_dict().items():
        hf_name = (name.replace("tok_embeddings", "model.embed_tokens").replace("output.weight", "lm_head.weight")
                   .replace("layers.", "model.layers.").replace("attention.w", "self_attn.")
                   .replace("self_attn.q", "self_attn.q_proj").replace("self_attn.k", "self_attn.k_proj")
                   .replace("self_attn.v", "self_attn.v_proj").replace("self_attn.o", "self_attn.o_proj")
                   .replace("feed_forward.w1", "mlp.gate_proj").replace("feed_forward.w2", "mlp.down_proj")
                   .replace("feed_forward.w3", "mlp.up_proj").replace("attention_norm", "input_layernorm")
                   .replace("ffn_norm", "post_attention_layernorm"))
        if hf_name == "norm.weight":
            hf_name = "model.norm.weight"
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # interleaved pairs (Meta) -> two halves per head (HF rotate-half)
            heads = w.shape[0] // c.head_dim
            w = w.view(heads, c.head_dim // 2, 2, c.dim).transpose(1, 2).reshape(w.shape)
        state[hf_name] = w
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)

    prompt = [1, 17, 300, 42, 9, 250]
    [ours] = generate(sharp_model, [prompt], max_new_tokens=32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                          pad_token_id=0)
    assert ours.tokens == out[0, len(prompt):].tolist()


def test_batched_equals_unbatched_with_padding_and_chunked_prefill(sharp_model):
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 300], [1, 99, 98, 97, 96]]
    alone = [generate(sharp_model, [p], max_new_tokens=16)[0].tokens for p in prompts]
    for chunk in (2048, 3, 1):
        together = generate(sharp_model, prompts, max_new_tokens=16, prefill_chunk=chunk)
        assert [r.tokens for r in together] == alone
    assert alone[0] == _greedy_by_recompute(sharp_model, prompts[0], 16)


def test_logprobs_match_the_model_distribution(sharp_model):
    prompt = [1, 17, 300, 42]
    [res] = generate(sharp_model, [prompt], max_new_tokens=5, logprobs=True, prompt_logprobs=True)
    with torch.no_grad():
        logp = torch.log_softmax(sharp_model(torch.tensor([prompt + res.tokens]))[0], dim=-1)
    seq = prompt + res.tokens
    expected = [logp[i - 1, seq[i]].item() for i in range(1, len(seq))]
    assert res.prompt_logprobs[0] == 0.0
    assert res.prompt_logprobs[1:] + res.logprobs == pytest.approx(expected, abs=1e-4)


def test_seeded_sampling_is_reproducible_and_batch_independent(sharp_model):
    prompts = [[1, 5, 6], [1, 300, 301, 302, 303]]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50)
    a = generate(sharp_model, prompts, seed=5, **kw)
    b = generate(sharp_model, prompts, seed=5, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in generate(sharp_model, prompts, seed=6, **kw)]
    # row i of a batch samples with seed + i: the same as running it alone with that seed
    assert generate(sharp_model, [prompts[1]], seed=6, **kw)[0].tokens == a[1].tokens


def test_stop_ids_end_a_row_without_keeping_the_token(sharp_model):
    prompt = [1, 17, 300, 42, 9, 250]
    free = generate(sharp_model, [prompt], max_new_tokens=10)[0].tokens
    res = generate(sharp_model, [prompt], max_new_tokens=10, stop_ids=[free[4]])[0]
    assert res.tokens == free[:free.index(free[4])] and res.finish_reason == "stop"


def test_context_limit_errors_before_allocating_and_caps_new_tokens(sharp_model, monkeypatch):
    calls = []
    monkeypatch.setattr(generation.KVCache, "allocate", classmethod(lambda *a, **k: calls.append(1)))
    with pytest.raises(CodeLlamaError, match="256 tokens but the model's context is 256"):
        generate(sharp_model, [[1] * 256], max_new_tokens=1)
    with pytest.raises(CodeLlamaError, match="max_new_tokens"):
        generate(sharp_model, [[1, 2]], max_new_tokens=0)
    monkeypatch.setattr(generation_admission, "available_memory", lambda device: 10_000)
    with pytest.raises(CodeLlamaError, match="GiB is free"):
        generate(sharp_model, [[1, 2]], max_new_tokens=8)
    assert calls == []
    monkeypatch.undo()
    res = generate(sharp_model, [[1] * 250], max_new_tokens=100)[0]
    assert len(res.tokens) == 6 and res.finish_reason == "length"


class _ScriptedOutput(torch.nn.Module):
    """An output layer that ignores its input and puts all the mass on the next token of ``script``."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.vocab_size, self.script, self.calls = vocab_size, script, 0
        self.register_buffer("weight", torch.empty(0))  # carries device and dtype, as CodeLlama expects

    def forward(self, h):
        k, self.calls = self.calls, self.calls + 1  # one call per prefill, then one per decode step
        out = torch.full((*h.shape[:-1], self.vocab_size), -1e4)
        out[..., self.script[k] if k < len(self.script) else 3] = 0.0
        return out


def _scripted(config: ModelConfig, tokenizer: Tokenizer, script: list[int]) -> CodeLlama:
    """Our Transformer with a scripted output layer: generates ``script`` after any (short) prompt, to test
    the text layer on exact token sequences. ``model.fed`` records the tokens fed to it."""
    model = Transformer(config).eval()
    model.output = _ScriptedOutput(config.vocab_size, script)
    model.fed = []

    def record(module, args):
        tokens = args[0]
        if tokens.shape[1] > 1:  # a prefill: a new generation starts
            model.fed, model.output.calls = [], 0
        model.fed += tokens[0].tolist()
    model.tok_embeddings.register_forward_pre_hook(record)
    return CodeLlama(model, tokenizer, name="scripted")


@pytest.fixture
def tiny_tok(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer(tiny_tokenizer_path)


def test_streaming_deltas_join_to_the_exact_text_with_emoji_and_cjk(tiny_config, tiny_tok):
    target = " héllo 😀 中文字 🎉🎉 done\n    indented"
    script = tiny_tok.encode_infilling(target)
    assert sum(tiny_tok.id_to_piece(i).startswith("<0x") for i in script) >= 8  # byte fallback in play
    prompt = "x ="
    pids = tiny_tok.encode(prompt, bos=True)
    llama = _scripted(tiny_config, tiny_tok, script)
    stream = llama.complete(prompt, max_new_tokens=len(script), stream=True)
    deltas = []
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as done:
            final = done.value
            break
    assert isinstance(final, Completion) and final.tokens == script
    assert "".join(deltas) == final.text == target
    assert all("\ufffd" not in d for d in deltas) and len(deltas) > 5
    assert prompt + final.text == tiny_tok.decode(pids + final.tokens)
    assert llama.complete(prompt, max_new_tokens=len(script)).text == target


def test_incomplete_bytes_at_the_end_still_match_decode(tiny_tok):
    emoji = tiny_tok.encode_infilling("😀")
    ids = tiny_tok.encode_infilling("ab") + emoji[:2]
    ts = TextStream(tiny_tok.decode, [1])
    text = "".join(ts.push(t) for t in ids) + ts.flush()
    assert text == tiny_tok.decode(ids) and text.endswith("\ufffd")


def test_stop_strings_trim_and_are_never_streamed(tiny_config, tiny_tok):
    target = "a = 1\nb = 2\n\nprint(a)"
    script = tiny_tok.encode_infilling(target)
    llama = _scripted(tiny_config, tiny_tok, script)
    res = llama.complete("x", max_new_tokens=40, stop=["\n\n", "zzz"])
    assert res.text == "a = 1\nb = 2" and res.finish_reason == "stop"
    assert len(res.tokens) < len(script)
    deltas = list(llama.complete("x", max_new_tokens=40, stop=["\n\n"], stream=True))
    assert "".join(deltas) == "a = 1\nb = 2"
    # a stop string split across tokens, and one that never completes (held back, then released)
    assert llama.complete("x", max_new_tokens=40, stop=["= 2"]).text == "a = 1\nb "
    assert llama.complete("x", max_new_tokens=len(script), stop=["(a)!"]).text == target


def test_a_generated_space_piece_after_the_prompt_is_kept(real_tokenizer_path):
    tok = Tokenizer(real_tokenizer_path)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=32016, multiple_of=32, max_seq_len=128)
    pids = tok.encode("x =", bos=True)
    script = [tok.piece_to_id("▁return"), tok.piece_to_id("▁x")]
    llama = _scripted(config, tok, script)
    res = llama.complete("x =", max_new_tokens=2)
    assert res.text == " return x" and "x =" + res.text == tok.decode(pids + res.tokens)
    assert llama.complete("x =", max_new_tokens=2, echo=True).text == "x = return x"


def test_infill_feeds_the_spec_layout_stops_at_eot_and_keeps_indentation(tiny_config, tiny_tok):
    prefix, suffix, middle = "def f(x):\n", "\n    return y\n", "    y = x * 2"
    t = tiny_tok
    psm = [t.bos_id, t.prefix_id] + t.encode(prefix) + [t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id]
    spm = [t.bos_id, t.prefix_id, t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id] + t.encode(prefix)
    script = t.encode_infilling(middle) + [t.eot_id] + t.encode_infilling("junk")
    for layout, suffix_first in ((psm, False), (spm, True)):
        llama = _scripted(tiny_config, t, script)
        res = llama.infill(prefix, suffix, suffix_first=suffix_first, max_new_tokens=50)
        assert llama.model.fed[:len(layout)] == layout
        assert res.text == middle and res.finish_reason == "stop"
        assert res.tokens == t.encode_infilling(middle) and res.prompt_tokens == len(layout)
    assert "".join(llama.infill(prefix, suffix, suffix_first=True, stream=True, max_new_tokens=50)) == middle
    assert llama.infill(prefix, suffix, suffix_first=True, echo=True, max_new_tokens=50).text == \
        prefix + middle + suffix
    batch = llama.infill([prefix, prefix], [suffix, suffix], suffix_first=True, max_new_tokens=50)
    assert [c.text for c in batch] == [middle, middle]


def test_infill_real_vocabulary_layout(real_tokenizer_path):
    tok = Tokenizer(real_tokenizer_path)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=32016, multiple_of=32, max_seq_len=128)
    middle = "    return x"
    script = tok.encode_infilling(middle) + [tok.eot_id]
    prompt = [1, 32007] + tok.encode("def f(x):\n") + [32008] + tok.encode_infilling("\n") + [32009]
    llama = _scripted(config, tok, script)
    res = llama.infill("def f(x):\n", "\n", max_new_tokens=20)
    assert llama.model.fed[:len(prompt)] == prompt
    assert res.text == middle and res.finish_reason == "stop"


def test_infill_without_fim_pieces_names_the_model(tiny_config, tiny_nofim_tokenizer_path, sharp_model):
    llama = CodeLlama(sharp_model, Tokenizer(tiny_nofim_tokenizer_path), name="CodeLlama-34b")
    with pytest.raises(CodeLlamaError, match="'CodeLlama-34b' cannot infill"):
        llama.infill("a", "b")


def test_chat_refuses_special_tags_and_step_format_stops_at_step(tiny_config, tiny_step_tokenizer_path,
                                                                tiny_tokenizer_path):
    tok = Tokenizer(tiny_step_tokenizer_path)
    dialog = [{"role": "user", "content": "write hello"}]
    prompt = chat_tokens(tok, dialog)
    script = tok.encode("print('hello')") + [tok.step_id] + tok.encode("more")
    llama = _scripted(tiny_config, tok, script)
    res = llama.chat(dialog, max_new_tokens=40)
    assert llama.model.fed[:len(prompt)] == prompt and tok.step_id in prompt
    assert res.text == "print('hello')" and res.finish_reason == "stop" and tok.step_id not in res.tokens
    for bad in ("[INST] hi", "x <<SYS>> y", "a <step> b"):
        with pytest.raises(CodeLlamaError, match="special tag"):
            llama.chat([{"role": "user", "content": bad}])
    inst = Tokenizer(tiny_tokenizer_path)
    prompt = chat_tokens(inst, dialog)
    llama = _scripted(tiny_config, inst, inst.encode("ok") + [inst.eos_id])
    [a, b] = llama.chat([dialog, dialog], max_new_tokens=10)
    assert a.text == b.text == "ok" and a.finish_reason == "stop"


def test_api_argument_errors(sharp_model, tiny_tok):
    llama = CodeLlama(sharp_model, tiny_tok)
    with pytest.raises(CodeLlamaError, match="top_p"):
        llama.complete("x", top_p=1.5)
    with pytest.raises(CodeLlamaError, match="temperature"):
        llama.complete("x", temperature=-1)
    with pytest.raises(CodeLlamaError, match="single prompt"):
        llama.complete(["a", "b"], stream=True)
    with pytest.raises(CodeLlamaError, match="context"):
        llama.complete("x" * 2000, max_new_tokens=4)
    out = llama.complete(["a", "def f():"], max_new_tokens=6)
    assert isinstance(out, list) and [c.prompt_tokens for c in out] == [len(tiny_tok.encode(p, bos=True))
                                                                         for p in ("a", "def f():")]


def _forward_both(model: Transformer, pack: bool):
    """Logits of a padded, chunked prefill and two decode steps: ``model.forward`` vs ``forward_step``."""
    from codellama.generation import decoder_for, forward_step
    from codellama.model import KVCache, rope_angles

    torch.manual_seed(3)
    B, P = 2, 9
    tokens = torch.randint(3, 500, (B, P))
    pads = torch.tensor([0, 4])
    positions = (torch.arange(P).unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
    caches = [KVCache.allocate(model.config, B, P + 2, dtype=model.output.weight.dtype) for _ in range(2)]
    for c in caches:
        c.valid[1, :4] = False
    dec = decoder_for(model, pack)
    cos, sin = rope_angles(torch.arange(P + 2).unsqueeze(0), model.config.head_dim, model.config.rope_theta)
    ref, ours = [], []
    with torch.no_grad():
        for s, e in ((0, 5), (5, 9)):
            ref.append(model(tokens[:, s:e], positions[:, s:e], caches[0]))
            ours.append(forward_step(model, dec, tokens[:, s:e], positions[:, s:e], caches[1], (cos[0], sin[0]),
                                     True, last_only=False))
        for step in range(2):
            nxt = torch.tensor([[7 + step], [11 + step]])
            pos = (P - pads + step).view(B, 1)
            ref.append(model(nxt, pos, caches[0]))
            ours.append(forward_step(model, dec, nxt, pos, caches[1], (cos[0], sin[0]), True))
    return ref, ours


def test_forward_step_is_model_forward_bit_for_bit(sharp_model):
    ref, ours = _forward_both(sharp_model, pack=False)
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))


def test_packed_weights_agree_and_follow_weight_updates(sharp_model):
    from codellama.generation import can_pack, decoder_for, will_pack

    if not can_pack(sharp_model):
        pytest.skip("oneDNN weight packing is not available here")
    ref, ours = _forward_both(sharp_model, pack=True)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(ref, ours))
    prompt = [1, 17, 300, 42, 9, 250]
    packed = generate(sharp_model, [prompt], max_new_tokens=16, pack=True)[0].tokens
    assert packed == generate(sharp_model, [prompt], max_new_tokens=16, pack=False)[0].tokens
    # auto: pack unless the request's KV cache outweighs the weights; a packed copy, once made, is used
    decoder_for(sharp_model, False)
    assert will_pack(sharp_model, None, kv_cache_bytes=0) and not will_pack(sharp_model, None, 10**9)
    d1 = decoder_for(sharp_model, True)
    assert decoder_for(sharp_model, True) is d1 and d1.packed and will_pack(sharp_model, None, 10**9)
    with torch.no_grad():
        sharp_model.layers[0].feed_forward.w2.weight.mul_(3.0)  # a training step, say: the packed copy is stale
    assert decoder_for(sharp_model, True) is not d1
    assert generate(sharp_model, [prompt], max_new_tokens=16, pack=True)[0].tokens == \
        _greedy_by_recompute(sharp_model, prompt, 16)


def test_attention_in_row_blocks_matches_one_block(sharp_model, monkeypatch):
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1, 300, 301, 302]]
    ref = generate(sharp_model, prompts, max_new_tokens=8, prefill_chunk=5, logprobs=True)
    monkeypatch.setattr(generation_forward, "ATTENTION_MASK_ENTRIES", 20)  # forces blocks of a few query rows
    blocked = generate(sharp_model, prompts, max_new_tokens=8, prefill_chunk=5, logprobs=True)
    assert [r.tokens for r in blocked] == [r.tokens for r in ref]
    for a, b in zip(blocked, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 9, 48), (1, 64, 48), (3, 50, 48)])
def test_packed_linear_pads_rows_to_buckets_exactly(shape):
    from codellama.generation import _packed_linear, _packing_works

    if not _packing_works(torch.float32):
        pytest.skip("oneDNN weight packing is not available here")
    torch.manual_seed(0)
    w, x = torch.randn(24, 48), torch.randn(*shape)
    got = _packed_linear(w)(x)
    assert got.shape == (*shape[:-1], 24)
    assert torch.allclose(got, torch.nn.functional.linear(x, w), atol=1e-4)


def test_kv_cache_is_sized_to_the_request(sharp_model, monkeypatch):
    from codellama.generation import request_memory
    from codellama.model import KVCache

    made = []
    real = KVCache.allocate.__func__

    def spy(cls, *args, **kwargs):
        made.append(real(cls, *args, **kwargs))
        return made[-1]
    monkeypatch.setattr(generation.KVCache, "allocate", classmethod(spy))
    generate(sharp_model, [[1, 2, 3, 4, 5, 6, 7], [1, 2]], max_new_tokens=10)
    [cache] = made
    assert cache.k.shape[1] == 2 and cache.size == 7 + 10 - 1  # the last new token is never fed back
    assert cache.nbytes() == request_memory(sharp_model, 2, 7, cache.size, 2048)["kv_cache"]


def test_seed_beyond_2_pow_64_is_a_user_error_in_the_api_and_the_cli(sharp_model, tiny_tok, capsys):
    # torch.Generator.manual_seed overflowed on 2**64: a ValueError from deep inside, an "internal error" in the CLI.
    llama = CodeLlama(sharp_model, tiny_tok)
    for call in (lambda **kw: llama.complete("x", **kw), lambda **kw: llama.infill("a", "b", **kw),
                 lambda **kw: llama.chat([{"role": "user", "content": "hi"}], **kw)):
        with pytest.raises(CodeLlamaError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            call(max_new_tokens=2, temperature=0.8, seed=2**64)
    # The top seed works, and n rows from it wrap around to seed 0, 1, ... (mod 2**64).
    wrapped = llama.complete(["x", "x"], max_new_tokens=6, temperature=0.8, seed=2**64 - 1)
    assert wrapped[1].tokens == llama.complete("x", max_new_tokens=6, temperature=0.8, seed=0).tokens

    from codellama import cli
    capsys.readouterr()
    assert cli.main(["complete", "x", "--temperature", "0.8", "--seed", str(2**64)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: seed must be an integer in [0, 2**64)") and err.count("\n") == 1


def test_empty_prompt_is_an_error_in_complete(sharp_model, tiny_tok):
    llama = CodeLlama(sharp_model, tiny_tok)
    with pytest.raises(CodeLlamaError, match="^prompt is empty"):
        llama.complete("", max_new_tokens=4)
    with pytest.raises(CodeLlamaError, match="^prompt 1 is empty"):
        llama.complete(["a", ""], max_new_tokens=4)
    with pytest.raises(CodeLlamaError, match="^prompt is empty"):
        llama.complete("", max_new_tokens=4, stream=True)


def test_max_new_tokens_beyond_the_context_is_an_error_unless_shrunk(sharp_model, tiny_tok):
    llama = CodeLlama(sharp_model, tiny_tok)  # context 256
    prompt = "x = 1\n" * 46
    n = len(tiny_tok.encode(prompt, bos=True))
    room = 256 - n
    assert 10 < room < 200
    with pytest.raises(CodeLlamaError, match=f"is {n} tokens and max_new_tokens is 200.* context of 256 tokens; "
                                             f"use max_new_tokens <= {room}"):
        llama.complete(prompt, max_new_tokens=200)
    with pytest.raises(CodeLlamaError, match="prompt 1 is"):
        llama.complete(["a", prompt], max_new_tokens=200)
    with pytest.raises(CodeLlamaError, match="max_new_tokens"):
        llama.infill(prompt, "", max_new_tokens=250)
    with pytest.raises(CodeLlamaError, match="max_new_tokens"):
        llama.chat([{"role": "user", "content": prompt}], max_new_tokens=250)
    cut = llama.complete(prompt, max_new_tokens=200, shrink_max_new_tokens=True)
    whole = llama.complete(prompt, max_new_tokens=None)
    assert cut.tokens == whole.tokens and len(cut.tokens) == room and cut.finish_reason == "length"
    assert llama.complete(prompt, max_new_tokens=room).tokens == whole.tokens  # exactly fits: fine
    streamed = llama.complete(prompt, max_new_tokens=None, stream=True)
    assert "".join(streamed) == whole.text
    with pytest.raises(CodeLlamaError, match="max_new_tokens must be an integer"):
        llama.complete(prompt, max_new_tokens=0)


# ---- the CPU decode fast paths (issue 18): each against the plain computation ---------------------------------
def test_blas_gemv_equals_linear_and_follows_torch_threads():
    """float32 batch-1 products through numpy's OpenBLAS: F.linear's values (float32 rounding), the weight shared
    (no copy), and OpenBLAS kept at torch's thread count."""
    from codellama.generation_forward import blas_gemv, sync_blas_threads

    torch.manual_seed(0)
    w = torch.randn(300, 96)
    gemv = blas_gemv(w)
    if gemv is None:
        pytest.skip("numpy's BLAS is not OpenBLAS (or threadpoolctl is missing)")
    x = torch.randn(1, 1, 96)
    assert gemv(x).shape == (1, 1, 300)
    torch.testing.assert_close(gemv(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert blas_gemv(w.bfloat16()) is None and blas_gemv(w.t()) is None  # float32, contiguous only
    before = torch.get_num_threads()
    numpy_blas = generation_forward._BLAS["controllers"]  # the OpenBLAS libraries loaded (found at first use)
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            sync_blas_threads()
            assert numpy_blas and all(lib.get_num_threads() == n for lib in numpy_blas)  # every OpenBLAS loaded
    finally:
        torch.set_num_threads(before)
        sync_blas_threads()


def test_one_query_attention_equals_sdpa():
    from codellama.generation_forward import SMALL_ATTENTION_ELEMENTS, one_query_attention

    torch.manual_seed(0)
    for H, KV, hd, S in ((8, 2, 32, 40), (32, 8, 128, SMALL_ATTENTION_ELEMENTS // (8 * 128) + 50)):  # both branches
        cache_k, cache_v = torch.randn(2, KV, S + 7, hd), torch.randn(2, KV, S + 7, hd)
        k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # views of a cache, as decode reads them
        q = torch.randn(2, H, 1, hd)
        mask = torch.rand(2, 1, 1, S) > 0.3
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(one_query_attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
        got = one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None).float()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert (got - ref).abs().max() < 2e-2  # bfloat16 inputs: within their rounding


def test_bfloat16_decode_fast_path_agrees_with_model_forward(sharp_model):
    """The bf16 fast path (fused norms, q|k rotated together, one-query attention) against ``model.forward`` in
    bf16: logits within bf16's rounding (relative 2e-2 of the logits' scale), the same greedy tokens."""
    from codellama.generation import can_pack

    model = copy.deepcopy(sharp_model).to(torch.bfloat16)
    for pack in (False, True):
        if pack and not can_pack(model):
            continue
        ref, ours = _forward_both(model, pack=pack)
        for a, b in zip(ref, ours):
            scale = a.abs().max()
            assert (a.float() - b.float()).abs().max() <= 2e-2 * scale
        prompt = [1, 17, 300, 42, 9, 250]
        assert generate(model, [prompt], max_new_tokens=16, pack=pack)[0].tokens == \
            _greedy_by_recompute(model, prompt, 16)
