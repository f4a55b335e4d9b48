// Package cliflag parses a subcommand's flags wherever they appear among
// its positional arguments (`glmtopo model inspect DIR --json` as well as
// `glmtopo model inspect --json DIR`), which the standard flag package
// stops doing at the first positional argument.
package cliflag

import "flag"

// Parse parses args into fs, accepting flags before, between and after
// positional arguments; "--" ends the flags, and everything after it is
// positional. Afterwards fs.Args() holds the positional arguments in order.
func Parse(fs *flag.FlagSet, args []string) error {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		rest := fs.Args()
		consumed := len(args) - len(rest)
		if consumed > 0 && args[consumed-1] == "--" {
			positional = append(positional, rest...) // after "--": no more flags
			break
		}
		if len(rest) == 0 {
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	// Leave fs.Args() as the positionals: "--" stops parsing at once.
	return fs.Parse(append([]string{"--"}, positional...))
}
