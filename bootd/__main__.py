from bootd.cli import main

raise SystemExit(main())
