from segproxy.cli import main

raise SystemExit(main())
