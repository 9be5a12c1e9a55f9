from .cli import main

# The name in usage lines and man pages, and of shell completion's variable (_LIVESPLICE_COMPLETE)
main(prog_name="livesplice")
