from fair_calib.cli import main

main()
