"""Data a user gives: data files (one, or a glob), a dataset folder, or a hub id; each file format checked here, where
a bad row can be named by its line."""

import glob
import json
import re
from pathlib import Path

from grpo_cli.errors import GrpoError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED = ("dataset_dict.json", "state.json")  # a folder written by save_to_disk
ROW = '{"question": ..., "answer": ...}'


def _kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _lines(path: Path):
    """(number, text) of each line of a UTF-8 file (a BOM allowed); a line that is not UTF-8 stops with its number."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise GrpoError(
                        f"{path} line {number} is not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                        ": save the file as UTF-8"
                    ) from None
    except OSError as exc:
        raise GrpoError(f"data file {path} cannot be read ({exc.strerror}): check its permissions") from exc


def _json_lines(path: Path) -> int:
    """The rows of a JSON lines file, each checked to be one JSON object."""
    rows = 0
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GrpoError(
                f"{path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}): fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise GrpoError(f"{path} line {number} is {_kind(row)}, not a JSON object: write each row as {ROW}")
        rows += 1
    return rows


def _json(path: Path) -> tuple[int, bool]:
    """The rows of a .json file -> (count, whether they are under "data"). A file that is not one JSON document is
    read as JSON lines."""
    text = "".join(line for _, line in _lines(path))
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path), False
    under_data = isinstance(whole, dict) and isinstance(whole.get("data"), list)
    if isinstance(whole, dict) and not under_data:
        keyed = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if keyed:
            raise GrpoError(
                f'{path} holds its rows under {keyed[0]!r}: put them under "data" ({{"data": [...]}}), '
                "or write the file as a list of rows"
            )
        return 1, False  # one object: one row
    rows = whole["data"] if under_data else whole
    if not isinstance(rows, list):
        raise GrpoError(f"{path} holds {_kind(rows)}: give a list of rows [{ROW}, ...], or one JSON object a line")
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad:
        raise GrpoError(f"{path} row {bad} is {_kind(rows[bad - 1])}, not a JSON object: write each row as {ROW}")
    return len(rows), under_data


def _csv(path: Path) -> tuple[int, list[str]]:
    """The rows and the header of a CSV file; a row with more fields than the header is an error with its line
    (pandas would quietly take the first column as the index)."""
    import csv

    records = csv.reader((line for _, line in _lines(path)))
    header = next(records, None)
    rows, start = 0, records.line_num + 1
    for record in records:
        if len(record) > len(header or []):
            raise GrpoError(
                f"{path} line {start} has {len(record)} fields and the header {len(header)}: quote the fields that "
                'hold commas ("a, b") or fix the header'
            )
        rows, start = rows + bool(record), records.line_num + 1
    if header and not rows:
        raise GrpoError(f"data file {path} has a header and no rows: add one row per example below it")
    return rows, header or []


def _from_files(pattern: str) -> list[dict]:
    """Local data files (one, or several through a glob) of one format, with ``datasets``."""
    from datasets import Features, Value, load_dataset

    where = str(Path(pattern).expanduser())
    matched = sorted(glob.glob(where)) if glob.has_magic(pattern) else [where]
    files = [f for f in matched if Path(f).is_file()]
    if not files:
        what = "does not exist"
        if glob.has_magic(pattern):
            what = "matches only folders" if matched else "no file matches"
        raise GrpoError(f"data file {pattern} {what}: give an existing {', '.join(BUILDERS)} file, or a glob of them")
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1 or (suffix := suffixes.pop()) not in BUILDERS:
        found = ", ".join(sorted({Path(f).suffix or "(no extension)" for f in files}))
        raise GrpoError(
            f"{pattern}: unknown data format {found!r}: use {', '.join(BUILDERS)} files, one format at a time"
        )
    # Check the text formats here, where a bad row can be named by its line; datasets would not say which
    options, rows = {}, None
    if suffix == ".jsonl":
        rows = sum(_json_lines(Path(f)) for f in files)
    elif suffix == ".json":
        counted = [_json(Path(f)) for f in files]
        rows = sum(n for n, _ in counted)
        if counted[0][1]:
            options["field"] = "data"  # {"data": [...]}; a .json of one object a line is read as JSON lines
    elif suffix == ".csv":
        counted = [_csv(Path(f)) for f in files]
        rows = sum(n for n, _ in counted)
        headers = {tuple(h) for _, h in counted}
        if len(headers) == 1 and len(set(header := headers.pop())) == len(header):
            # as text, as written: "007" stays "007", an empty cell is "" and "NA" is "NA", not a float or null
            options.update(features=Features({h: Value("string") for h in header}), keep_default_na=False)
    if rows == 0 or all(Path(f).stat().st_size == 0 for f in files):
        raise GrpoError(f"data file {pattern} holds no rows: give a file with at least one example")
    try:
        return list(load_dataset(BUILDERS[suffix], data_files=files, split="train", **options))
    except Exception as exc:
        cause = str(exc.__cause__ or exc).splitlines()[0][:120] if str(exc.__cause__ or exc) else type(exc).__name__
        if unclosed := re.search(r"EOF inside string starting at row (\d+)", cause):
            raise GrpoError(
                f'{pattern}: a quote (") opened on line {int(unclosed[1]) + 1} is never closed: close it, '
                'and write a quote inside a quoted field as two ("")'
            ) from exc
        raise GrpoError(
            f"{pattern} could not be read as {suffix[1:]} ({cause}): check that the file really is {suffix[1:]}"
        ) from exc


def _pick_split(data, split: str, where: str):
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data  # one data set without splits, read whole as a data file is
    if split not in data:
        raise GrpoError(f"{where} has no split {split!r} (splits: {', '.join(data)}): use --split NAME")
    return data[split]


def _from_folder(path: Path, split: str, config: str | None) -> list[dict]:
    """A folder written by ``save_to_disk``, or a Hub-style dataset folder (data files named by split)."""
    from datasets import load_dataset, load_from_disk

    if any((path / name).is_file() for name in SAVED):
        try:
            data = load_from_disk(str(path))
        except Exception as exc:
            cause = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise GrpoError(f"{path} looks written by save_to_disk but does not load ({cause}): save it again") from exc
        return list(_pick_split(data, split, str(path)))
    try:
        data = load_dataset(str(path), config)
    except Exception as exc:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):  # a bad row in a data file, by its line
            if check := {".jsonl": _json_lines, ".json": _json, ".csv": _csv}.get(file.suffix.lower()):
                check(file)
        raise GrpoError(
            f"{path} is not a dataset folder ({str(exc).splitlines()[0][:120]}): give a folder written by "
            "save_to_disk, one with data files (.jsonl, .csv, .parquet, ...), or a data file"
        ) from exc
    return list(_pick_split(data, split, str(path)))


def _from_hub(name: str, config: str | None, split: str) -> list[dict]:
    from datasets import load_dataset
    from huggingface_hub import constants

    instead = "download it where the hub is reachable (save_to_disk) and pass that folder, or give data files"
    if constants.HF_HUB_OFFLINE:
        cached = None
        try:  # a data set already in the local cache still loads offline
            cached = load_dataset(name, config, split=split)
        except Exception:
            pass
        if cached is None:
            raise GrpoError(f"{name} is a hub data set and the hub is offline here (HF_HUB_OFFLINE): {instead}")
        return list(cached)
    try:
        return list(load_dataset(name, config, split=split))
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise GrpoError(f"could not load {name} from the hub ({type(exc).__name__}: {first}): {instead}") from exc


HUB_ALIASES = {"gsm8k": ("openai/gsm8k", "main"), "mbpp": ("google-research-datasets/mbpp", "full")}


def rows(name: str, config: str | None, split: str) -> list[dict]:
    """A dataset folder, data files (a glob works), or a hub id (``gsm8k`` is openai/gsm8k, ``mbpp``
    google-research-datasets/mbpp), through ``datasets``."""
    if name in HUB_ALIASES:
        name, default = HUB_ALIASES[name]
        config = config or default
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_folder(path, split, config)
    if glob.has_magic(name) or path.suffix.lower() in BUILDERS or path.exists() or name.startswith((".", "/", "~")):
        return _from_files(name)
    if name.count("/") <= 1:
        return _from_hub(name, config, split)
    raise GrpoError(f"data set {name} does not exist: give a hub id, a dataset folder or data files")


def has_splits(name: str) -> bool:
    """False for data files and a save_to_disk folder of one Dataset, which are read whole."""
    path = Path(name).expanduser()
    files = not path.is_dir() and bool(path.suffix or glob.has_magic(name))
    return not (files or (path / "state.json").is_file())
