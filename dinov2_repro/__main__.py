from dinov2_repro.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
