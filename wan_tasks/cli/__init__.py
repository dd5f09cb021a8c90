"""The `wan-video` command: generate, batch, limits, check, the emulator and the demo."""
