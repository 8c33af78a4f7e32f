"""XTTS-v2 compatible speech: text BPE, voice profile, GPT-2 spectrogram synthesizer, HiFi-GAN vocoder."""
