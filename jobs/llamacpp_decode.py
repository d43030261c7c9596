"""llama.cpp's N=1 decode tokens/s on a GGUF (through llama-cpp-python), for jobs/bench_quant.sh: the same
prompt text, new tokens and threads as the tpimpi runs beside it; median of 3 runs; appends a JSON line.

    python3 jobs/llamacpp_decode.py MODEL.gguf NEW_TOKENS THREADS PROMPT OUT.jsonl LABEL
"""

import json
import statistics
import sys
import time


def main() -> int:
    path, n, threads, prompt, out, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7]
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp does not import: pip install llama-cpp-python (builds from source, about 6 minutes)")
        return 0
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
    ids = llm.tokenize(prompt.encode())
    rates = []
    for _ in range(3):
        llm.reset()
        times = []
        for _tok in llm.generate(ids, temp=0.0):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    row = {"system": "llama.cpp", "label": label, "model": path, "threads": threads, "new_tokens": n,
           "prompt_tokens": len(ids), "decode_tokens_per_s": statistics.median(rates),
           "llama_cpp": llama_cpp.__version__}
    print(json.dumps(row))
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
