from chathub.cli import main

raise SystemExit(main())
