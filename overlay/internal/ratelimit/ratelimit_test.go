package ratelimit

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	l := Limiter{Every: time.Hour}
	tests := []struct {
		name           string
		wantOK         bool
		wantSuppressed uint64
	}{
		{"first event passes", true, 0},
		{"second is held back", false, 0},
		{"third is held back", false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n, ok := l.Allow()
			if ok != tc.wantOK || n != tc.wantSuppressed {
				t.Fatalf("Allow() = %d, %v; want %d, %v", n, ok, tc.wantSuppressed, tc.wantOK)
			}
		})
	}
	l.mu.Lock()
	l.last = time.Now().Add(-2 * time.Hour)
	l.mu.Unlock()
	if n, ok := l.Allow(); !ok || n != 2 {
		t.Fatalf("after the interval Allow() = %d, %v; want 2 held back, true", n, ok)
	}
}
