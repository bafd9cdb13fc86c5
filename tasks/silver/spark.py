"""Spark sessions: local mode on this machine, or a Spark Connect server (a real cluster).

One session per process (`getOrCreate`): starting the JVM is the slow part, so every silver run
in a process reuses it. Databricks Connect speaks the same protocol as `transform.spark_remote`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tasks import REPO_ROOT

log = logging.getLogger(__name__)


# The modules Spark's Python workers import (kept free of the project's heavy imports).
WORKER_MODULES = [
    "tasks/__init__.py",
    "tasks/errors.py",
    "tasks/lakehouse/__init__.py",
    "tasks/lakehouse/layout.py",
    "tasks/silver/__init__.py",
    "tasks/silver/blob_io.py",
    "tasks/silver/cleaning.py",
    "tasks/silver/parts.py",
    "tasks/silver/tokenize.py",
]
_shipped: set[tuple[int, str]] = set()


def _local_cores(master: str) -> int:
    """Cores a local[...] master uses."""
    inner = master[master.find("[") + 1 : master.find("]")] if "[" in master else "1"
    inner = inner.split(",")[0].strip()
    return (os.cpu_count() or 1) if inner == "*" else max(1, int(inner))


def worker_env() -> dict[str, str]:
    """Environment the Python workers need: our modules importable, no nested thread pools."""
    paths = [str(REPO_ROOT)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)
    ]
    return {"PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}


def spark_session(
    master: str = "local[*]",
    remote: str | None = None,
    driver_memory: str = "2g",
    app_name: str = "lakehouse-silver",
    extra_conf: dict[str, Any] | None = None,
) -> Any:
    """A SparkSession: Spark Connect when `remote` is set, else local mode on `master`."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if remote:
        spark = SparkSession.builder.remote(remote).appName(app_name).getOrCreate()
        ship_worker_code(spark)
        return spark

    # Python workers are the same interpreter as the driver, with the repo importable.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env = worker_env()
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    cluster = not master.startswith("local")
    cores = 2 if cluster else _local_cores(master)
    local_dir = Path(tempfile.gettempdir()) / f"spark-local-{os.getuid()}"
    conf: dict[str, Any] = {
        "spark.driver.memory": driver_memory,
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.local.dir": str(local_dir),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(2 * cores),
        "spark.sql.adaptive.enabled": "true",
        "spark.python.worker.reuse": "true",
        "spark.executorEnv.TOKENIZERS_PARALLELISM": "false",
    }
    if cluster:
        # A cluster's workers have no copy of this repo: the worker modules travel as a zip
        # (spark.submit.pyFiles), and their Python is the cluster's (PYSPARK_PYTHON there).
        conf["spark.submit.pyFiles"] = str(worker_zip())
        conf["spark.sql.shuffle.partitions"] = "8"
    else:
        conf["spark.executorEnv.PYTHONPATH"] = env["PYTHONPATH"]
        conf["spark.executorEnv.PYSPARK_PYTHON"] = sys.executable
    conf.update(extra_conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def worker_zip() -> Path:
    """A zip of WORKER_MODULES (named by their content) for addPyFile / spark.submit.pyFiles."""
    blob = b"".join((REPO_ROOT / m).read_bytes() for m in WORKER_MODULES)
    digest = hashlib.sha256(blob).hexdigest()[:12]
    archive = Path(tempfile.gettempdir()) / f"lakehouse-udf-{os.getuid()}" / f"silver_{digest}.zip"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(f".{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w") as zf:
            for module in WORKER_MODULES:
                zf.write(REPO_ROOT / module, module)
        os.replace(tmp, archive)
    return archive


def is_connect(spark: Any) -> bool:
    """True for a Spark Connect session (no SparkContext, code must be shipped)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def parallelism(spark: Any) -> int:
    """How many tasks can run at once (the number of slices worth splitting input into)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    try:
        return max(1, int(spark.conf.get("spark.default.parallelism")))
    except Exception:  # noqa: BLE001 - unset on most servers: fall back to shuffle partitions
        return max(1, min(int(spark.conf.get("spark.sql.shuffle.partitions", "8")), 64))


def ship_worker_code(spark: Any) -> None:
    """Send the worker modules to a Connect server (a cluster has no copy of this repo)."""
    blob = b"".join((REPO_ROOT / m).read_bytes() for m in WORKER_MODULES)
    digest = hashlib.sha256(blob).hexdigest()[:12]
    key = (id(spark), digest)
    if key in _shipped:
        return
    folder = Path(tempfile.mkdtemp(prefix="lakehouse-udf-"))
    archive = folder / f"lakehouse_silver_{digest}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for module in WORKER_MODULES:
            zf.write(REPO_ROOT / module, module)
    spark.addArtifacts(str(archive), pyfile=True)
    _shipped.add(key)


def stop_spark() -> None:
    """Stop this process's active session (tests; the CLI lets the JVM exit with Python)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
