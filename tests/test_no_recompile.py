"""After warm-up, serving never compiles: every shape that reaches jitted code is one of
the warmed buckets, whatever the mix of prompt lengths, batch sizes and sampling modes."""
from conserve_jax import LLM, SamplingParams


def test_serving_does_not_recompile_after_warmup():
    with LLM(model="random:tiny", max_model_len=128, max_num_seqs=4, max_prefill_tokens=64,
             max_prefill_seqs=2, num_blocks=64, warmup=True) as llm:
        runner = llm.engine.runner
        before = runner.compiled_count()
        assert before > 0
        prompts = [[3 + i % 50] * n for i, n in enumerate((1, 5, 31, 64, 65, 100, 7, 2))]
        params = [SamplingParams(max_tokens=m, temperature=t, top_p=p, top_k=k, logprobs=lp,
                                 ignore_eos=True)
                  for m, t, p, k, lp in [(20, 0, 1, 0, None), (9, 1.0, 1, 0, 2),
                                         (27, 0.7, 0.9, 0, None), (3, 1.0, 1, 5, 0),
                                         (25, 0, 1, 0, 20), (10, 1.0, 0.5, 3, None),
                                         (40, 0, 1, 0, None), (1, 0, 1, 0, None)]]
        outs = llm.generate(prompts, params)
        assert [len(o.token_ids) for o in outs] == [min(p.max_tokens, 128 - len(x))
                                                    for p, x in zip(params, prompts)]
        assert runner.compiled_count() == before
