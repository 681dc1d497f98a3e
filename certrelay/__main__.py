from certrelay import cli

cli.main()
