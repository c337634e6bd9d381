"""Output thread: stop strings end the stream there, tokens past the stop never reach the
client, and the step loop is told to stop the sequence; the engine publishes stats."""
from __future__ import annotations

import threading

from conserve_jax.engine_api import GenerationRequest, RequestStream
from conserve_jax.engine.output_delivery import FinalStats, OutputDelivery
from conserve_jax.engine.output_processor import OutputProcessor
from conserve_jax.runtime.step_plan import SampledToken
from conserve_jax.sampling_params import SamplingParams
from tests.coserve_helpers import wait_until


class CharTokenizer:
    """Token i is the character chr(97 + i); 25 is EOS."""

    eos_token_ids = [25]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids if i != 25)

    def convert_ids_to_tokens(self, ids):
        return [chr(97 + i) for i in ids]


def _run(tokens, sp, finish_at=None):
    stopped = []
    done = threading.Event()

    def on_stop(rid):
        stopped.append(rid)
        done.set()

    d = OutputDelivery(OutputProcessor(CharTokenizer(), 1000), on_stop)
    req = GenerationRequest("r", [0], sp)
    stream = RequestStream("r")
    d.register(req, stream, 1)
    for i, t in enumerate(tokens):
        d.token("r", SampledToken(t, -0.5, []), "length" if i == finish_at else None,
                FinalStats(0.1, 0.01))
    d.close()
    outs = []
    while not stream._q.empty():
        outs.append(stream.get(timeout=0))
    return outs, stopped


def test_stop_string_ends_stream_and_drops_later_tokens():
    # "abcde" then more tokens the step loop produced before it heard of the stop
    outs, stopped = _run([0, 1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=50, stop=["cd"]))
    assert stopped == ["r"]
    final = outs[-1]
    assert final.finished and final.finish_reason == "stop"
    assert sum(o.finished for o in outs) == 1
    text = "".join(o.text for o in outs)
    ids = [t for o in outs for t in o.token_ids]
    assert text == "ab"
    assert ids == [0, 1, 2, 3]  # nothing after the token that completed the stop string
    assert final.ttft_s == 0.1 and final.completion_tokens == 4


def test_token_level_finish_comes_with_the_token():
    outs, stopped = _run([0, 1, 2], SamplingParams(max_tokens=3), finish_at=2)
    assert not stopped
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason == "length" and "".join(o.text for o in outs) == "abc"


def test_engine_publishes_stats_and_stops_on_stop_string():
    from conserve_jax.entrypoints.llm import LLM

    with LLM(warmup=False, model="random:tiny", max_model_len=128, max_num_seqs=4, max_prefill_tokens=32,
             num_blocks=64) as llm:
        greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        full = llm.generate([[5, 6, 7]], greedy)[0]
        stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
        if not stop.strip():
            stop = full.text[-2:]
        cut = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=24, temperature=0.0,
                                                        ignore_eos=True, stop=[stop]))[0]
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert full.text.startswith(cut.text)
        assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
        # the step loop hears of the stop string after the stream ended: wait until it has
        wait_until(lambda: llm.engine.stats().offline_running == 0)
        st = llm.engine.stats()
        assert st.iterations > 0 and st.offline_tokens_total >= len(full.token_ids)
        assert st.online_running == st.offline_running == 0
        assert st.kv_blocks_offline == 0 and st.kv_blocks_total == 63
