"""Dialogue: several speakers from one script, each line in its speaker's voice and face, in one video.

script.py parses the script into turns and pauses, timeline.py places the spoken turns on one sound track (with
per-speaker stems and SRT cues), compose.py lays the speakers' frames out (cut, side_by_side, grid), and run.py
runs the whole dialogue, streaming the video clip by clip into the .mp4."""
