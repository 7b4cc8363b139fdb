import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI itself is being imported: the same one line as later
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
