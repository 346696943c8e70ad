from jepatune.cli import main

raise SystemExit(main())
