"""Generate text from a slim model's ONNX export with onnxruntime: CUDA when onnxruntime-gpu is
installed (KV cache kept on the GPU), CPU otherwise. Needs numpy, onnxruntime and a tokenizer only.

    pip install onnxruntime-gpu           # or: pip install onnxruntime (CPU)
    compress export ... --onnx            # a slim folder with onnx/model.onnx + onnx_config.json
    python examples/deploy_onnxruntime_gpu.py SLIM_FOLDER --prompt "The os module"
"""

import argparse
from pathlib import Path

from compress.runtime.onnx_runner import OnnxRunner, default_providers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="slim model folder (tokenizer files + onnx/ or model.onnx)")
    ap.add_argument("--prompt", default="The following example shows how")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="top-p sampling instead of greedy decoding")
    args = ap.parse_args()

    onnx_dir = args.folder / "onnx" if (args.folder / "onnx" / "model.onnx").exists() else args.folder
    runner = OnnxRunner(onnx_dir, providers=default_providers(), tokenizer=args.folder)
    print(f"onnxruntime provider: {runner.provider}")
    out = runner.generate(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=0.8, top_p=0.95, seed=0)
    print(args.prompt + out.text[0])


if __name__ == "__main__":
    main()
