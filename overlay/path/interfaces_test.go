package path

import (
	"net"
	"testing"
)

func TestInterfacePrefixes(t *testing.T) {
	got, err := InterfacePrefixes()
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range got {
		ifc, err := net.InterfaceByName(ip.Interface)
		if err != nil {
			t.Fatalf("%+v: %v", ip, err)
		}
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			t.Errorf("%+v: interface %s is down or loopback", ip, ifc.Name)
		}
		if !ip.Prefix.IsValid() || ip.Prefix.Addr().Is4In6() || ip.Prefix.Addr().IsLoopback() {
			t.Errorf("%+v: want a valid, unmapped, non-loopback address", ip)
		}
	}
}
