# Runs before the command line is parsed: an extension's own flags.
def preload(parser):
    parser.add_argument("--example-greeting", default="Hello", help="example-extension: the greeting its tab shows")
