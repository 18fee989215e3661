"""Write the built-in GGUF model (or --gguf FILE) as an HF folder in bfloat16, for servers that read
only HF checkpoints (vLLM's CPU build): transformers dequantizes the GGUF, save_pretrained writes it.

    python benchmarks/convert_to_hf.py OUT_DIR [--gguf FILE]
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from microserve.tokenizer import builtin_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--gguf", default=None, help="the GGUF file (default: the built-in model)")
    args = p.parse_args()
    path = args.gguf or builtin_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The model read from a GGUF counts as "quantized" and will not save: copy its (dequantized)
    # weights into a plain model of the same config.
    config = read.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(read.state_dict())
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(args.out)
    print(f"wrote {args.out} from {path}")


if __name__ == "__main__":
    main()
