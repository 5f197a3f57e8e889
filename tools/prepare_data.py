"""Tokenizes a corpus into megatron's indexed format (<prefix>.bin/.idx) for training.

    python tools/prepare_data.py --input corpus.jsonl --output-prefix data/mycorpus/text_document
    python tools/prepare_data.py --input texts/ --output-prefix data/books/text_document --tokenizer bpe

--input: a .jsonl file (one JSON object per line, text in --jsonl-field), a .txt file (one
document), or a directory searched recursively for both. --tokenizer bpe trains a
byte-level BPE on the input (or reuses --tokenizer-path / the tokenizer.json next to the
output prefix when it exists). Then train with the printed data.* overrides. Errors are
one line on stderr and exit status 2. The work itself is anyexperts.data.prepare.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# megatron.core's import warns that TE/apex are absent; data preparation uses neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
# Run as a script from a checkout that is not pip-installed, too.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from anyexperts.data.prepare import prepare_corpus, prepare_tokenizer  # noqa: E402
from anyexperts.data.tokenizers import TOKENIZER_KINDS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="a .jsonl file, a .txt file, or a directory of them")
    parser.add_argument("--output-prefix", required=True, help="path of the output without .bin/.idx")
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZER_KINDS)
    parser.add_argument("--tokenizer-path", default=None,
                        help="hf: the tokenizer.json to use; bpe: where the trained one is kept "
                             "(default: tokenizer.json next to the output prefix)")
    parser.add_argument("--bpe-vocab-size", type=int, default=4096)
    parser.add_argument("--jsonl-field", default="text", help="the JSONL field that holds the document text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_prefix = os.path.abspath(os.path.expanduser(args.output_prefix))
    try:
        tokenizer = prepare_tokenizer(
            args.tokenizer,
            input_path=args.input,
            out_dir=os.path.dirname(output_prefix),
            tokenizer_path=args.tokenizer_path,
            bpe_vocab_size=args.bpe_vocab_size,
            jsonl_field=args.jsonl_field,
        )
        stats = prepare_corpus(args.input, output_prefix, tokenizer, jsonl_field=args.jsonl_field,
                               show_progress=not args.no_progress)
    except (ValueError, OSError) as err:  # user-facing errors: one line, no traceback
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(f"tokenizer: {tokenizer!r}")
    print(f"wrote {stats.summary()}")
    overrides = [f"data.source=prepared", f"data.data_prefix={output_prefix}", f"data.tokenizer={args.tokenizer}"]
    if args.tokenizer != "byte":
        overrides.append(f"data.tokenizer_path={tokenizer.path}")
    print("train on it with: " + " ".join(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
