//go:build !race

package dns

// raceEnabled: see race_test.go.
const raceEnabled = false
