//go:build race

package dns

// raceEnabled: the race detector makes the read loop's Go code several times slower (it answers
// some 120k queries a second over loopback under it, 300k without), so the flood test floods at a
// quarter of the rate under it.
const raceEnabled = true
