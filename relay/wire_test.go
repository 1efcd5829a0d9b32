package relay

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
)

func TestFrames(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	other := bytes.Repeat([]byte{8}, 32)
	var sender [32]byte
	sender[0] = 0xAA
	obs4 := netip.MustParseAddrPort("198.51.100.7:40000")
	obs6 := netip.MustParseAddrPort("[2001:db8::7]:40001")

	t.Run("bind round trip and MAC", func(t *testing.T) {
		b := AppendBind(nil, 42, 99, key)
		id, nonce, err := ParseBind(b)
		if err != nil || id != 42 || nonce != 99 {
			t.Fatalf("ParseBind = %d, %d, %v", id, nonce, err)
		}
		if !VerifyBind(b, key) || VerifyBind(b, other) {
			t.Fatal("VerifyBind accepts the wrong key or rejects the right one")
		}
		b[5] ^= 1
		if VerifyBind(b, key) {
			t.Fatal("VerifyBind accepts a modified frame")
		}
	})
	for _, obs := range []netip.AddrPort{obs4, obs6} {
		t.Run("bindack "+obs.String(), func(t *testing.T) {
			nonce, got, err := ParseBindAck(AppendBindAck(nil, 5, obs))
			if err != nil || nonce != 5 || got != obs {
				t.Fatalf("ParseBindAck = %d, %v, %v", nonce, got, err)
			}
		})
	}
	t.Run("data", func(t *testing.T) {
		b := append(AppendDataHeader(nil, 7), "payload"...)
		id, p, err := ParseData(b)
		if err != nil || id != 7 || string(p) != "payload" {
			t.Fatalf("ParseData = %d, %q, %v", id, p, err)
		}
	})
	for _, tc := range []struct {
		name string
		p    Ping
	}{
		{"ping", Ping{Sender: sender, TxID: 1}},
		{"pong v4", Ping{Pong: true, Sender: sender, TxID: 2, Observed: obs4}},
		{"pong v6", Ping{Pong: true, Sender: sender, TxID: 3, Observed: obs6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := AppendPing(nil, tc.p, key)
			got, err := ParsePing(b)
			if err != nil || got != tc.p {
				t.Fatalf("ParsePing = %+v, %v; want %+v", got, err, tc.p)
			}
			if !VerifyPing(b, key) || VerifyPing(b, other) {
				t.Fatal("VerifyPing wrong")
			}
		})
	}
}

func TestFrameRejects(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	bind := AppendBind(nil, 1, 1, key)
	ping := AppendPing(nil, Ping{TxID: 1}, key)
	cases := []struct {
		name  string
		parse func() error
	}{
		{"empty", func() error { _, _, err := ParseBind(nil); return err }},
		{"wireguard initiation", func() error { _, _, err := ParseData([]byte{1, 0, 0, 0, 9, 9, 9, 9}); return err }},
		{"bind truncated", func() error { _, _, err := ParseBind(bind[:len(bind)-1]); return err }},
		{"bind wrong version", func() error { b := bytes.Clone(bind); b[2] = 9; _, _, err := ParseBind(b); return err }},
		{"bind as data", func() error { _, _, err := ParseData(bind[:5]); return err }},
		{"bindack bad family", func() error {
			b := AppendBindAck(nil, 1, netip.MustParseAddrPort("1.2.3.4:5"))
			b[12] = 5
			_, _, err := ParseBindAck(b)
			return err
		}},
		{"bindack trailing", func() error {
			_, _, err := ParseBindAck(append(AppendBindAck(nil, 1, netip.MustParseAddrPort("1.2.3.4:5")), 0))
			return err
		}},
		{"ping truncated", func() error { _, err := ParsePing(ping[:20]); return err }},
		{"ping trailing", func() error {
			b := append(bytes.Clone(ping[:len(ping)-16]), 0)
			b = append(b, ping[len(ping)-16:]...)
			_, err := ParsePing(b)
			return err
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.parse(); !errors.Is(err, ErrFrame) {
				t.Fatalf("err = %v, want ErrFrame", err)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	key := bytes.Repeat([]byte{7}, 32)
	f.Add(AppendBind(nil, 1, 1, key))
	f.Add(AppendPing(nil, Ping{Pong: true, Observed: netip.MustParseAddrPort("1.2.3.4:5")}, key))
	f.Fuzz(func(t *testing.T, b []byte) {
		ParseBind(b)
		ParseBindAck(b)
		ParseData(b)
		ParsePing(b)
	})
}
