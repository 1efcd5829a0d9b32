//go:build race

package netstack

// raceEnabled: the race detector allows at most 8,128 live goroutines, so tests that hold many
// flows hold fewer under it.
const raceEnabled = true
