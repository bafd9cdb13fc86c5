"""Bronze sources: what a dataset or set of files consists of, unit by unit, and which is new.

A unit is one file (identity: path + size + sha256, or the blob's etag on Azure) or one hub data
file; its batch id is derived from that identity, so the same unit always maps to the same
bronze batch. A unit already in bronze with the same content is skipped; the same path with
other content is quarantined for a person to decide (ingesting it would duplicate rows).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.bronze.progress import UnitProgress, unit_progress
from tasks.bronze.schedule import usable_cpus
from tasks.errors import UserError
from tasks.lakehouse.batches import committed_batches
from tasks.lakehouse.layout import bronze_dir, stable_id
from tasks.lakehouse.storage import Lakehouse, iter_local_files, sha256_file

PACKAGED_BUILDERS = {"json", "parquet", "csv", "text", "arrow"}
EXTENSION_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


class SourceError(UserError, ValueError):
    """The source cannot be read as asked; the message names it and the fix."""


@dataclass(frozen=True)
class SourceUnit:
    """One ingestible unit: a file or a dataset shard, with its identity."""

    uri: str
    builder: str
    fingerprint: str
    size: int | None = None
    hub_dataset: str | None = None
    location: str | None = None  # where to read it when not `uri` (a hub file at its commit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_id_for(dataset_key: str, language: str, unit: SourceUnit) -> str:
    """The bronze batch id of a unit: same unit, same id."""
    return stable_id("bronze", dataset_key, language, unit.uri, unit.fingerprint)


def resolve_units(
    dataset: str,
    name: str | None,
    data_files: str | list[str] | None,
    split: str,
    revision: str | None,
    token: str | None,
    lake: Lakehouse | None = None,
) -> list[SourceUnit]:
    """List the units of a source, each with a content fingerprint."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
    local_dataset = Path(dataset).expanduser()
    if dataset not in PACKAGED_BUILDERS and is_dataset_repo(local_dataset):
        # A folder laid out like a hub dataset repo (README.md with `configs:`): the same
        # `datasets` resolution as the Hub, each data file a unit identified by its content.
        hub = _hub_units(str(local_dataset), name, split, revision, token, patterns)
        local = [(u.builder, Path(u.uri)) for u in hub if u.builder != "hub"]
        return sorted(_local_units(local), key=lambda u: u.uri) or hub
    if dataset in PACKAGED_BUILDERS or local_dataset.exists():
        if local_dataset.exists() and dataset not in PACKAGED_BUILDERS:
            base = local_dataset
            patterns = [str(base / p) for p in patterns] if patterns else [str(base)]
        if not patterns:
            raise SourceError(
                f"source.dataset={dataset!r} needs source.data_files (a file, glob or folder)"
            )
        return _file_units(dataset, patterns, lake)
    return _hub_units(dataset, name, split, revision, token, patterns)


def is_dataset_repo(path: Path) -> bool:
    """A local folder laid out like a hub dataset repo: a README.md whose YAML has `configs:`."""
    readme = path / "README.md"
    if not readme.is_file():
        return False
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return False
    return isinstance(meta, dict) and bool(meta.get("configs"))


def _file_units(dataset: str, patterns: list[str], lake: Lakehouse | None) -> list[SourceUnit]:
    units: list[SourceUnit] = []
    for pattern in patterns:
        if pattern.startswith("az://"):
            if lake is None or lake.is_local:
                raise SourceError(
                    f"source.data_files={pattern!r} is on Azure but the lakehouse is local: "
                    "use an az:// lakehouse.root with its block, or a local path"
                )
            found = _azure_units(dataset, pattern, lake)
        else:
            found = _local_units([(dataset, p) for p in iter_local_files(pattern)])
        if not found:
            raise SourceError(
                f"source.data_files={pattern!r} matches no file: check the path or glob "
                "(relative paths are resolved from the current folder)"
            )
        units.extend(found)
    return sorted({u.uri: u for u in units}.values(), key=lambda u: u.uri)


def _local_units(files: list[tuple[str, Path]]) -> list[SourceUnit]:
    """Units of local files, hashed several at once (hashlib releases the GIL): a language's
    shards are hashed in about 1/cpus of the time one after another would take."""
    if len(files) <= 1:
        return [_local_unit(d, p) for d, p in files]
    with ThreadPoolExecutor(min(len(files), usable_cpus())) as pool:
        return list(pool.map(lambda f: _local_unit(*f), files))


def _local_unit(dataset: str, path: Path) -> SourceUnit:
    try:
        return SourceUnit(
            uri=str(path.resolve()),
            builder=_builder_for(dataset, path.name),
            fingerprint=f"sha256:{sha256_file(path)}",
            size=path.stat().st_size,
        )
    except OSError as exc:
        raise SourceError(
            f"{path}: cannot be read ({exc.strerror or type(exc).__name__}). Fix its "
            "permissions or remove it from source.data_files."
        ) from None


def _azure_units(dataset: str, pattern: str, lake: Lakehouse) -> list[SourceUnit]:
    path = pattern.split("://", 1)[1]
    fs, call = lake.fs, lake._call  # _call turns SDK errors into StorageError
    lake._fresh()  # new landing files must be visible to a long-lived process
    if any(ch in path for ch in "*?["):
        paths = call(fs.glob, path)
    elif call(fs.isdir, path):
        paths = call(fs.find, path)
    else:
        paths = [path] if call(fs.exists, path) else []
    units = []
    for p in sorted(paths):
        info = call(fs.info, p)
        if info.get("type") == "directory":
            continue
        etag = (info.get("etag") or "").strip('"')
        md5 = (
            info.get("content_settings", {}).get("content_md5")
            if isinstance(info.get("content_settings"), dict)
            else None
        )
        units.append(
            SourceUnit(
                uri=f"az://{p}",
                builder=_builder_for(dataset, p.rsplit("/", 1)[-1]),
                fingerprint=f"etag:{etag}" if etag else f"md5:{md5}",
                size=info.get("size"),
            )
        )
    return units


def _builder_for(dataset: str, filename: str) -> str:
    if dataset in PACKAGED_BUILDERS:
        return dataset
    name = filename.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = Path(name).suffix
    if ext not in EXTENSION_BUILDERS:
        raise SourceError(
            f"{filename}: cannot tell its format from the extension {ext!r}; set "
            f"source.dataset to one of {sorted(PACKAGED_BUILDERS)}"
        )
    return EXTENSION_BUILDERS[ext]


def _hub_units(
    dataset: str,
    name: str | None,
    split: str,
    revision: str | None,
    token: str | None,
    patterns: list[str],
) -> list[SourceUnit]:
    """Units of a hub dataset: one per data file at a pinned revision, else one per split."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(
            dataset,
            name,
            revision=revision,
            token=token,
            data_files=patterns or None,
        )
    except Exception as exc:  # noqa: BLE001 - many error types; all mean the same to a user
        raise _hub_error(exc, dataset, name) from None
    files = []
    data_files = getattr(builder.config, "data_files", None) or {}
    if split not in data_files and data_files:
        raise SourceError(
            f"source.split={split!r} not in {dataset} ({name}); available: {sorted(data_files)}"
        )
    files = [str(f) for f in data_files.get(split, [])] if data_files else []
    builder_name = getattr(builder, "name", None) or "parquet"
    if files and all(f.startswith("hf://datasets/") for f in files):
        return _hub_file_units(dataset, files, builder_name, token)
    if files:
        return [
            SourceUnit(uri=f, builder=builder_name, fingerprint=f"hub:{f}", hub_dataset=dataset)
            for f in files
        ]
    ident = f"hub:{dataset}:{name}:{split}:{revision or builder.hash}"
    return [
        SourceUnit(
            uri=f"hf://datasets/{dataset}/{name or ''}/{split}",
            builder="hub",
            fingerprint=ident,
            hub_dataset=dataset,
        )
    ]


def _hub_file_units(
    dataset: str, files: list[str], builder_name: str, token: str | None
) -> list[SourceUnit]:
    """Hub data files identified by content: repo path + the LFS sha256 (or git blob id) the Hub
    reports for the file at the resolved commit. A new repo commit that leaves a file unchanged
    keeps its identity; the unit is read at that commit (`location`)."""
    from huggingface_hub import HfApi

    by_commit: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for f in files:  # hf://datasets/<org>/<name>@<commit>/<path in repo>
        org, rest = f.removeprefix("hf://datasets/").split("/", 1)
        name_rev, path = rest.split("/", 1)
        name, _, commit = name_rev.partition("@")
        by_commit.setdefault((f"{org}/{name}", commit or "main"), []).append((path, f))
    units = []
    for (repo, commit), entries in by_commit.items():
        try:
            infos = HfApi(token=token).get_paths_info(
                repo, [p for p, _ in entries], revision=commit, repo_type="dataset"
            )
        except Exception as exc:  # noqa: BLE001 - network, auth, offline: one message
            raise _hub_error(exc, dataset, None) from None
        found = {i.path: i for i in infos}
        for path, location in entries:
            info = found.get(path)
            lfs = getattr(info, "lfs", None)
            digest = getattr(lfs, "sha256", None) if lfs is not None else None
            blob = getattr(info, "blob_id", None)
            fingerprint = f"sha256:{digest}" if digest else f"git-blob:{blob}" if blob else None
            units.append(
                SourceUnit(
                    uri=f"hf://datasets/{repo}/{path}",
                    builder=builder_name,
                    fingerprint=fingerprint or f"hub:{location}",
                    size=getattr(info, "size", None),
                    hub_dataset=dataset,
                    location=location,
                )
            )
    return units


def _hub_error(exc: Exception, dataset: str, name: str | None) -> SourceError:
    text = f"{type(exc).__name__}: {exc}"
    if "BuilderConfig" in text or "Config name" in text or "config" in text.lower() and name:
        return SourceError(
            f"source.name={name!r} is not a config of {dataset!r}: {str(exc).splitlines()[0]}. "
            "Set source.name to one of its configs (for CulturaX, a language code such as fr)."
        )
    if "gated" in text.lower() or "401" in text or "403" in text:
        return SourceError(
            f"{dataset} is gated: accept its terms on the Hub and save your token in the "
            "Prefect Secret block named by source.token_secret (`HF_TOKEN=... python -m "
            "blocks create`)."
        )
    if "offline" in text.lower() or "Connection" in text or "resolve" in text.lower():
        return SourceError(
            f"source.dataset={dataset!r}: not a local path, not one of "
            f"{sorted(PACKAGED_BUILDERS)}, and the Hugging Face Hub cannot be reached to look "
            f"it up ({type(exc).__name__}). Check the name, the path, or the network."
        )
    return SourceError(
        f"source.dataset={dataset!r} (config {name!r}) could not be loaded: "
        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


@dataclass
class Plan:
    """What a bronze run will do."""

    todo: list[SourceUnit]
    skipped: list[str]
    changed: list[str]
    # Progress of the todo units already started (cut by the row budget), by unit uri.
    progress: dict[str, UnitProgress] = field(default_factory=dict)

    @property
    def partial(self) -> list[str]:
        return [u.uri for u in self.todo if u.uri in self.progress]


def plan_units(lake: Lakehouse, dataset_key: str, language: str, units: list[SourceUnit]) -> Plan:
    """Split units into new or partial ones, already ingested ones, and changed ones.

    A unit whose last chunk filled its row budget is partial: it is todo again (its progress
    says where to go on), not skipped.
    """
    rel = bronze_dir(dataset_key, language)
    by_uri: dict[str, set[str]] = {}
    for b in committed_batches(lake, rel):
        for uri, fingerprint in b.sources:
            by_uri.setdefault(uri, set()).add(fingerprint)
    seen_units = [u for u in units if u.fingerprint in by_uri.get(u.uri, ())]
    ids = {u.uri: batch_id_for(dataset_key, language, u) for u in seen_units}
    progress = unit_progress(lake, rel, ids.values())
    todo, skipped, changed, started = [], [], [], {}
    for u in units:
        seen = by_uri.get(u.uri)
        if seen is None and u.location and u.location in by_uri:
            skipped.append(u.uri)  # ingested before identity by content, at this commit
        elif seen is None:
            todo.append(u)
        elif u.fingerprint in seen:
            p = progress.get(ids[u.uri])
            if p is not None and p.partial:
                todo.append(u)
                started[u.uri] = p
            else:
                skipped.append(u.uri)
        else:
            # Same path, different content: ingesting it again would duplicate rows under new
            # ids. Quarantine it for a person to decide (rename the file to ingest it anyway).
            changed.append(u.uri)
    return Plan(todo=todo, skipped=skipped, changed=changed, progress=started)
