"""`python -m infra.cli`: the chatllm command line."""

from infra.cli.main import main

if __name__ == "__main__":
    main()
