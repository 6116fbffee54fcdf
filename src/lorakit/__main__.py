from lorakit.cli import entry_point

entry_point()
