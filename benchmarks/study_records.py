"""The results files of the benchmark studies (sampler_study.py, guidance_sweep.py): one JSON record with a list of
results, read back at start so that an interrupted study continues, and written whole after every setting."""
import json
from pathlib import Path


def read_record(out: Path, what: str, key: str):
    """The record in `out` (a dict with a 'results' list and `key`), None if there is none yet; exits naming the
    file if it is not a `what` record."""
    if not out.exists(): return None
    try: record = json.loads(out.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f'{out} is not a {what} record ({e}); give another --out') from None
    if not (isinstance(record, dict) and isinstance(record.get('results'), list) and key in record):
        raise SystemExit(f'{out} is not a {what} record; give another --out')
    return record


def write_record(out: Path, record: dict) -> None:
    """Replace `out` by `record` in one step (a temporary file renamed over it): a kill never leaves half a file."""
    tmp = out.with_suffix('.tmp')
    tmp.write_text(json.dumps(record, indent=1) + '\n')
    tmp.replace(out)
