"""Audio decoding with PyAV: any container ffmpeg reads (wav, flac, mp3, ogg, or a video's sound track).

Speech models take mono float32 at one fixed rate (16 kHz for Whisper), so decoding resamples on
the way out of the codec with libswresample, the resampler `ffmpeg -ac 1 -ar 16000` uses: the
same samples openai-whisper's own loader produces, without a subprocess or a temporary file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_audio(path: Path, sampling_rate: int = 16000) -> np.ndarray:
    """(N,) mono float32 in [-1, 1] at `sampling_rate`, from the file's first audio stream.

    Multichannel audio is downmixed by libswresample's default matrix (as `ffmpeg -ac 1` does).
    Raises FileNotFoundError for a missing file and ValueError for a file without decodable audio.
    """
    import av

    path = Path(path)
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive number of Hz, not {sampling_rate}")
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}; fix the path in the manifest's audio column")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                kinds = ", ".join(s.type for s in container.streams) or "no streams"
                raise ValueError(
                    f"{path} has no audio stream ({kinds}); point the manifest at a file with sound, or drop this row"
                )
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))  # each (1, n) packed
            chunks.extend(out.to_ndarray() for out in resampler.resample(None))  # the resampler's tail
    except av.FFmpegError as exc:
        raise ValueError(
            f"could not decode audio from {path}: {exc}; the file is corrupt or not a media format "
            "ffmpeg reads: re-encode it (e.g. `ffmpeg -i in -ar 16000 -ac 1 out.wav`) or drop this row"
        ) from exc
    audio = np.concatenate(chunks, axis=1).reshape(-1) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise ValueError(f"{path} has an audio stream but no samples decoded from it; re-encode it or drop this row")
    return np.ascontiguousarray(audio, dtype=np.float32)
