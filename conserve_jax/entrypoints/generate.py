"""`conserve-jax generate`: stream an answer to one prompt from a local model.

The chat template is applied when the model has one (instruct models), unless --raw.
In a multi-process run (`--num-processes`) every process runs the same command with its
own `--process-id`; process 0 prints the answer, the others follow its step plans and exit
0 when it is done.
"""
from __future__ import annotations

import argparse
import sys
import time

from conserve_jax.engine_args import add_engine_args, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the question or text to continue")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--system", default=None, help="system message for chat models")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_engine_args(p, defaults={"max_num_seqs": 4})


def run(args) -> int:
    from conserve_jax.engine.engine import Engine
    from conserve_jax.engine_api import GenerationRequest
    from conserve_jax.runtime.follower import follow_if_follower
    from conserve_jax.sampling_params import SamplingParams

    try:
        config = engine_config_from_args(args)
        code = follow_if_follower(config)
        if code is not None:
            return code
        engine = Engine(config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = engine.tokenizer
    if tok.has_chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                         add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k)
    try:
        t0 = time.perf_counter()
        stream = engine.submit(GenerationRequest("cli", ids, sp))
        n, first = 0, None
        for delta in stream:
            if delta.token_ids and first is None:
                first = time.perf_counter() - t0
            n += len(delta.token_ids)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.finished:
                reason = delta.finish_reason
                if delta.error:
                    print(f"\nerror: {delta.error}", file=sys.stderr)
                    return 1
        total = time.perf_counter() - t0
        sys.stdout.write("\n")
        rate = (n - 1) / (total - first) if n > 1 and first is not None else 0.0
        print(f"[{n} tokens, finish={reason}, first token {first or 0:.2f} s, "
              f"{rate:.1f} tokens/s after it]", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    return 0
