"""The runners ``belle-edge bench`` measures, one per worker process (so each has its own peak RSS).

Every runner answers the same two questions on the same token ids, greedy, exactly ``new_tokens`` tokens
(EOS ignored, so all variants do the same work):

* ``single(prompt_ids, new_tokens)``: time to first token, prefill and decode speed of one reply;
* ``dialogue(turns, new_tokens)``: the same per turn of a multi-turn chat, as each tool is normally used
  for one (belle_edge: a ChatSession that prefills only the new turn; transformers: ``generate`` on the
  whole conversation each turn; llama.cpp: ``generate`` on the whole conversation, which reuses the
  cached prefix).

Runners: ``belle-ort`` (an artifact on ONNX Runtime), ``belle-torch`` (the torch backend), ``transformers``
(``generate``), ``llama.cpp`` (llama-cpp-python on a GGUF file).
"""
from __future__ import annotations

import os
import resource
import time

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so
    a worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _SessionRunner:
    """belle_edge runners: drive the backend directly for ``single``, a ChatSession for ``dialogue``."""

    model = None  # a belle_edge ChatModel

    def single(self, prompt_ids: list[int], new_tokens: int) -> dict:
        """One reply through the runtime's own decode loop (runtime/decode.py), stop tokens off."""
        from belle_edge.mask import MaskConfig
        from belle_edge.runtime.decode import Decoding
        from belle_edge.runtime.sampler import Sampler, SamplingConfig

        backend = self.model.backend_factory(len(prompt_ids) + new_tokens + 1)
        mask = MaskConfig.off()
        ids = np.asarray(prompt_ids, dtype=np.int64)
        n = len(ids)
        decoding = Decoding(self.model.tokenizer, Sampler(SamplingConfig()), max_new_tokens=new_tokens)

        def step(token: int) -> np.ndarray:
            return backend.forward(np.array([token]), np.array([backend.n]), np.array([0]), mask=mask)

        t0 = time.perf_counter()
        logits = backend.forward(ids, np.arange(n), np.zeros(n, dtype=np.int64), mask=mask)
        for _ in decoding.run(logits, step):
            pass
        return _figures(n, new_tokens, t0, decoding.t_first, decoding.t_last)

    def dialogue(self, turns: list[str], new_tokens: int) -> list[dict]:
        from dataclasses import replace

        model = replace(self.model, stop_token_ids=frozenset())  # run every reply to new_tokens
        session = model.session(window=self.window, sinks=4, max_new_tokens=new_tokens, max_kv_tokens=8192)
        out = []
        for message in turns:
            stats = session.send(message).stats
            out.append({"ttft_ms": stats.ttft_ms, "decode_tok_s": stats.decode_tok_s,
                        "prompt_tokens": stats.prompt_tokens, "kv_tokens": stats.kv_tokens})
        return out


class BelleOrt(_SessionRunner):
    def __init__(self, artifact: str, threads: int, window: int | None = 3):
        import belle_edge

        self.model = belle_edge.load(artifact, threads=threads)
        self.window = window


class BelleTorch(_SessionRunner):
    def __init__(self, checkpoint: str | None, threads: int, window: int | None = 3):
        import torch

        import belle_edge

        torch.set_num_threads(threads)
        self.model = belle_edge.load(checkpoint)
        self.window = window


class Transformers:
    def __init__(self, hf_dir: str, threads: int, chat_format, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.fmt, self.tokenizer = chat_format, tokenizer

    def _generate(self, ids: list[int], new_tokens: int) -> tuple[list[int], float, float, float]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps = []

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return False

        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([ids]), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False,
                                      stopping_criteria=StoppingCriteriaList([Stamp()]), pad_token_id=0)
        return out[0, len(ids):].tolist(), t0, stamps[0], stamps[-1]

    def single(self, prompt_ids, new_tokens):
        _, t0, t1, t2 = self._generate(prompt_ids, new_tokens)
        return _figures(len(prompt_ids), new_tokens, t0, t1, t2)

    def dialogue(self, turns, new_tokens):
        return _dialogue_by_prefix(self, turns, new_tokens)


class LlamaCpp:
    def __init__(self, gguf_path: str, threads: int, chat_format, tokenizer):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf_path, n_ctx=8192, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)
        self.fmt, self.tokenizer = chat_format, tokenizer

    def _generate(self, ids, new_tokens, *, reset=True):
        if reset:
            self.llm.reset()
        out = []
        t0 = time.perf_counter()
        t1 = None
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if t1 is None:
                t1 = time.perf_counter()
            if len(out) == new_tokens:
                break
        t2 = time.perf_counter()
        return out, t0, t1, t2

    def single(self, prompt_ids, new_tokens):
        _, t0, t1, t2 = self._generate(prompt_ids, new_tokens)
        return _figures(len(prompt_ids), new_tokens, t0, t1, t2)

    def dialogue(self, turns, new_tokens):
        self.llm.reset()
        return _dialogue_by_prefix(self, turns, new_tokens, reset=False)


def _dialogue_by_prefix(runner, turns, new_tokens, **kw) -> list[dict]:
    """Peers see the whole conversation every turn, as their users send it."""
    enc = lambda text: runner.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    ids, out = enc(runner.fmt.system_text(None)), []
    for i, message in enumerate(turns):
        ids += enc(runner.fmt.first_turn_text(None, message) if i == 0 else runner.fmt.turn_text(message))
        reply, t0, t1, t2 = runner._generate(list(ids), new_tokens, **kw)
        fig = _figures(len(ids), new_tokens, t0, t1, t2)
        out.append({"ttft_ms": fig["ttft_ms"], "decode_tok_s": fig["decode_tok_s"], "prompt_tokens": len(ids),
                    "kv_tokens": len(ids) + len(reply)})
        ids += reply + enc(runner.fmt.reply_end)
    return out


def _figures(prompt: int, new: int, t0: float, t1: float, t2: float) -> dict:
    return {"ttft_ms": (t1 - t0) * 1e3, "prefill_tok_s": prompt / max(t1 - t0, 1e-9),
            "decode_tok_s": (new - 1) / max(t2 - t1, 1e-9), "prompt_tokens": prompt, "new_tokens": new}


def make_runner(spec: dict):
    """Build a runner from a JSON spec (what the driver sends a worker)."""
    kind, threads = spec["kind"], spec["threads"]
    if kind == "belle-ort":
        return BelleOrt(spec["artifact"], threads, spec.get("window", 3))
    if kind == "belle-torch":
        return BelleTorch(spec.get("checkpoint"), threads, spec.get("window", 3))
    from tokenizers import Tokenizer

    from belle_edge.runtime.chat_format import chat_format_from_dict

    fmt = chat_format_from_dict(spec["chat_format"])
    tok = Tokenizer.from_file(spec["tokenizer"])
    if kind == "transformers":
        return Transformers(spec["hf_dir"], threads, fmt, tok)
    if kind == "llama.cpp":
        return LlamaCpp(spec["gguf"], threads, fmt, tok)
    raise ValueError(kind)


def worker_main() -> None:
    """A worker: reads one JSON spec line, builds its runner, then answers JSON requests line by line."""
    import json
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(sys.stdin.readline())
    try:
        runner = make_runner(spec)
        print(json.dumps({"ready": True, "peak_rss_mb": peak_rss_mb()}), flush=True)
    except Exception as e:  # reported to the driver as a skipped variant, with the reason
        print(json.dumps({"ready": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}),
              flush=True)
        return
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "single":
            result = runner.single(req["prompt_ids"], req["new_tokens"])
        elif req["op"] == "dialogue":
            result = runner.dialogue(req["turns"], req["new_tokens"])
        else:
            break
        print(json.dumps({"result": result, "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    worker_main()
