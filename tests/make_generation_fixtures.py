"""Write tests/fixtures/generation.json: transformers' greedy ``generate(do_sample=False)`` token ids, 20 new
tokens, for prompt p1 of every committed fixture (eager, float32) and for two prompts on each packaged real
model (transformers loading the same GGUF file, dequantized to float32), so that tests/test_generation.py
checks factrace's key/value-cache generation without torch.

    python tests/make_generation_fixtures.py [--no-real]
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import oracle  # noqa: E402

OUT = os.path.join(HERE, "fixtures", "generation.json")
N_NEW = 20
REAL_PROMPTS = ["The Eiffel Tower is located in the city of", "Fact: The Colosseum is in the country of"]
REAL = ("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b")


def hf_greedy(model, ids, n=N_NEW):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([list(map(int, ids))]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return [int(t) for t in out[0, len(ids):]]


def main(argv):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    data = json.load(open(OUT)) if os.path.exists(OUT) else {"fixtures": {}, "real": {}}
    root = os.path.join(HERE, "fixtures", "models")
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.exists(os.path.join(d, "expected.npz")):
            continue
        ids = np.load(os.path.join(d, "expected.npz"))["p1_ids"]
        hf = oracle.load_hf(d)
        data["fixtures"][name] = {"prompt_ids": [int(i) for i in ids], "new_ids": hf_greedy(hf, ids)}
        print(name, data["fixtures"][name]["new_ids"])
    if "--no-real" not in argv:
        import torch
        import transformers

        import factrace
        from factrace.io import packaged

        for name in REAL:
            if not packaged.is_installed(name):
                print(f"{name} not installed: kept as is")
                continue
            path = packaged.resolve(name)
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
            m = factrace.load(name)
            data["real"][name] = []
            for p in REAL_PROMPTS:
                ids = m.encode(p)
                new = hf_greedy(hf, ids)
                data["real"][name].append({"prompt": p, "prompt_ids": [int(i) for i in ids], "new_ids": new,
                                           "text": m.decode(new)})
                print(name, repr(p), repr(m.decode(new)))
            del hf
    with open(OUT, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
