"""Streaming mode: the media relay, playback, call control, sockets, frames, writer, breaker."""
