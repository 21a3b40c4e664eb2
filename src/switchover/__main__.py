from switchover.cli import main

# prog_name: `python -m switchover` answers shell completion (_SWITCHOVER_COMPLETE) and
# prints usage exactly as the installed `switchover` script does.
main(prog_name="switchover")
