package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
)

// joinToken returns the join token from --join-token or --join-token-file (exactly one). A token
// file that other users may read is accepted with a warning; an empty token is refused. The token
// itself is never logged.
func joinToken(flag, file string, log *slog.Logger) (string, error) {
	switch {
	case flag != "" && file != "":
		return "", errors.New("give --join-token or --join-token-file, not both")
	case flag != "":
		if strings.TrimSpace(flag) == "" {
			return "", errors.New("--join-token is blank")
		}
		return strings.TrimSpace(flag), nil
	case file == "":
		return "", errors.New("no join token: give --join-token-file (or --join-token)")
	}
	fi, err := os.Stat(file)
	if err != nil {
		return "", fmt.Errorf("--join-token-file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("--join-token-file %s: not a regular file", file)
	}
	if fi.Mode().Perm()&0o004 != 0 {
		log.Warn("join token file is readable by every user; chmod 600 it", "file", file, "mode", fi.Mode().Perm().String())
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--join-token-file: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("--join-token-file %s is empty", file)
	}
	return token, nil
}
