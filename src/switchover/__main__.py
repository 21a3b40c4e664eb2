from switchover.cli import main

main()
