"""Active Directory storage of IPsec policy ([MS-GPIPSEC])."""
