"""
Checks of stage b's `--resume` state (corpus mode's checkpoints, prompt mode's finished batches). The state file
is written last and is the set's manifest: it names every other file of the set with its sha256. On resume each
named file must be a plain name inside the state's directory and match its sha256, and every field must agree
with the run (its fingerprint and plan) and with the other fields; anything else is refused with one line,
"checkpoint damaged (...); rerun without --resume", and never used. The hashes catch a torn or replaced file;
the field checks catch an edit that also rewrites the manifest.
"""

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace.files.atomic import file_sha256

_SHA256 = re.compile(r"[0-9a-f]{64}")


def damaged(what: str) -> PipelineError:
    return PipelineError(f"checkpoint damaged ({what}); rerun without --resume")


def read_state(p: Path, keys: set) -> dict:
    """The state file's JSON object, which must have exactly these keys."""
    try:
        state = json.loads(Path(p).read_bytes().decode("utf-8"))
    except OSError as e:
        raise damaged(f"cannot read {p}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise damaged(f"{p} is not valid JSON") from None
    if not isinstance(state, dict):
        raise damaged(f"{p} is not a JSON object")
    missing, extra = sorted(keys - state.keys()), sorted(state.keys() - keys)
    if missing:
        raise damaged(f"{p} lacks the field {missing[0]!r} (written by an older version?)")
    if extra:
        raise damaged(f"{p} has an unknown field {extra[0]!r}")
    return state


def whole(value, what: str) -> int:
    if type(value) is not int:  # not a bool, a float or a string
        raise damaged(f"{what} is {json.dumps(value)}, not a whole number")
    return value


def names(value, what: str) -> list:
    if not isinstance(value, list):
        raise damaged(f"{what} is {json.dumps(value)}, not a list of file names")
    return value


def check_place(directory: Path, state_file: Path):
    """Before a resume: the checkpoint directory is a real directory (not a link to elsewhere, whose files a run
    would read and remove), and its state file, if there is one, a regular file (a run writes it by a rename, so
    a directory, link or other special file in its place is not the run's)."""
    directory, state_file = Path(directory), Path(state_file)
    if directory.is_symlink():
        raise damaged(f"{directory} is a link to elsewhere, not the run's checkpoint directory")
    if directory.exists() and not directory.is_dir():
        raise damaged(f"{directory} is not a directory")
    if state_file.is_symlink() or (state_file.exists() and not state_file.is_file()):
        what = "a link" if state_file.is_symlink() else "a directory" if state_file.is_dir() else "not a file"
        raise damaged(f"{state_file} is {what}, not the run's state file")


def member(directory: Path, name, expected: str, what: str) -> Path:
    """A file the state names: it must resolve inside the directory, and be the name the run gives it."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise damaged(f"{what} names {json.dumps(name)}, not a file")
    base = Path(directory).resolve()
    p = (base / name).resolve()
    if p == base or not p.is_relative_to(base):
        raise damaged(f"{what} names {name!r}, which lies outside the checkpoint directory {base}")
    if name != expected:
        raise damaged(f"{what} names {name!r} where the run's file is {expected!r}")
    return p


def verify_files(directory: Path, listed, files: list[str], where: str):
    """Every file of the set is listed in the manifest `listed` ({name: sha256}), nothing else is, and each one's
    bytes match its sha256."""
    if not isinstance(listed, dict) or set(listed) != set(files):
        raise damaged(f"{where}: the manifest does not list exactly the state's files")
    for name in files:
        digest = listed[name]
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise damaged(f"{where}: the manifest's sha256 of {name} is {json.dumps(digest)}")
        p = Path(directory) / name
        try:
            actual = file_sha256(p)
        except OSError as e:
            raise damaged(f"cannot read {p}: {e.strerror}") from None
        if actual != digest:
            raise damaged(f"{p} does not match the sha256 in {where}")


def load_npz(p: Path) -> dict:
    """Every array of an .npz (no pickle)."""
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise damaged(f"cannot read {p}: {e}") from None


def load_npy(p: Path) -> np.ndarray:
    try:
        a = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise damaged(f"cannot read {p}: {e}") from None
    if not isinstance(a, np.ndarray):
        raise damaged(f"{p} is not one array")
    return a


def array(arrays: dict, key: str, shape: tuple, dtype, where: str, finite: bool = False,
          nonnegative: bool = False) -> np.ndarray:
    """arrays[key], which must have this shape and dtype (and be finite, or >= 0, when asked)."""
    a = arrays.get(key)
    if a is None:
        raise damaged(f"{where} lacks {key}")
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
        raise damaged(f"{where}: {key} is {a.dtype} {a.shape}, not {np.dtype(dtype)} {tuple(shape)}")
    if finite and not np.isfinite(a).all():
        raise damaged(f"{where}: {key} holds NaN or infinite values")
    if nonnegative and (a < 0).any():
        raise damaged(f"{where}: {key} holds negative values")
    return a


def scalar(arrays: dict, key: str, dtype, where: str):
    return array(arrays, key, (), dtype, where).item()


def check_top(values: np.ndarray, ids: np.ndarray, active: np.ndarray, where: str):
    """Each column's top examples: values in rank order (ties to the lower id), finite, distinct ids, and a value
    > 0 exactly where `active` (the same shape) says the neuron was active in that sample."""
    if not np.isfinite(values).all():
        raise damaged(f"{where}: top_values holds NaN or infinite values")
    if len(values) > 1:
        later = values[1:] > values[:-1]
        tied = (values[1:] == values[:-1]) & (ids[1:] <= ids[:-1])
        if (later | tied).any():
            raise damaged(f"{where}: top_values are not in rank order")
        if (np.diff(np.sort(ids, axis=0), axis=0) == 0).any():
            raise damaged(f"{where}: top_ids name a sample twice for one neuron")
    if (active != (values > 0)).any():
        raise damaged(f"{where}: top_values disagree with the neurons' activity in those samples")


def packed_bits(packed: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """bits[r, j] of a bit-packed matrix (np.packbits, axis 1) at rows[r, j] of each column j."""
    cols = np.arange(rows.shape[1])
    return (packed[rows, cols // 8] >> (7 - cols % 8).astype(np.uint8)) & 1 == 1


def padding_clear(packed: np.ndarray, n: int) -> bool:
    """Whether the bits past the n neurons of a packed matrix's last byte are 0, as np.packbits leaves them."""
    return n % 8 == 0 or not len(packed) or not (packed[:, -1] & np.uint8((1 << (8 - n % 8)) - 1)).any()
