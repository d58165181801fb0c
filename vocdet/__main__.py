from vocdet.cli import main

main()
